"""The cases scripts/fault_sweep.py replays: issue 20's bad inputs and faults, at least one per
item, each with the behaviour the issue defines for it (the judges and setups: fault_checks.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fault_checks import (
    FULL_DISK,
    QUICK_S,
    READ_ONLY,
    SAMPLE,
    TORN,
    Case,
    Result,
    edit_layers,
    exported,
    fail,
    fell_back,
    flip,
    in_namespace,
    kill,
    live_trainer,
    log_tail,
    metric_rows,
    nested_jsonl,
    not_replayable,
    ok,
    prepare,
    refused,
    resumable,
    shards,
    sources,
    succeeded,
    text_lines,
    tiny_sources,
    trained_to,
    undamaged,
    wait_for,
    weak,
)

# --- 1: a row nested too deeply to parse ------------------------------------------------------


def nested_skip(sweep, where: Path):
    nested_jsonl(where / "nested.jsonl")
    proc = sweep.train(where / "run", sources(where / "nested.jsonl"))
    if not (result := succeeded(proc)).ok:
        return result
    last = metric_rows(where / "run")[-1]
    skipped = sum(v for k, v in last.items() if k.startswith("data/skipped_"))
    return ok(f"{skipped:.0f} record(s) skipped") if skipped else fail("no record counted skipped")


def nested_strict(sweep, where: Path):
    at = nested_jsonl(where / "nested.jsonl")
    proc = sweep.train(where / "run", sources(where / "nested.jsonl"), "--config.data.strict=true")
    return refused(proc, at)


def nested_tokenizer(sweep, where: Path):
    """`tokenizer train` stops at a bad row (data/files.py iter_records): the strict error."""
    at = nested_jsonl(where / "nested.jsonl")
    proc = sweep.cli("tokenizer", "train", "--input", where / "nested.jsonl", SAMPLE / "*.txt",
                     "--model-prefix", where / "tok", "--vocab-size", "600")  # fmt: skip
    if proc.rc != 0:
        return refused(proc, at)
    if not (result := succeeded(proc)).ok:
        return result
    return ok("tok.model written") if (where / "tok.model").is_file() else fail("no tok.model")


def nested_prepare(sweep, where: Path):
    nested_jsonl(where / "nested.jsonl")
    proc = sweep.run(prepare(sweep, where / "out", where / "nested.jsonl"))
    if not (result := succeeded(proc)).ok:
        return result
    manifest = json.loads((where / "out" / "sources_0" / "manifest.json").read_text())
    skipped = sum(manifest["skipped"].values())
    return (
        ok(f"{manifest['documents']} documents, {skipped} skipped")
        if skipped
        else fail(f"the manifest counts no skip: {manifest['skipped']}")
    )


# --- 2: token shards and their manifest ---------------------------------------------------------


def prepare_interrupted(sweep, where: Path):
    """prepare into a folder prepared before, SIGKILLed once its first new shard is written."""
    out, first = where / "out", text_lines(where / "a.txt", 200)
    if (proc := sweep.run(prepare(sweep, out, first))).rc != 0:
        return fail(f"the first prepare failed: {proc.tail()}")
    second = text_lines(where / "b.txt", 60_000, "beta")  # 2 shards, one after the other
    new_shard = out / "sources_0" / "shard-00000-of-00002.array_record"
    proc = sweep.start(prepare(sweep, out, second), where / "prepare.log")
    try:
        written = wait_for(lambda: new_shard.exists() and new_shard.stat().st_size > 0, proc, 300)
    finally:
        kill(proc)
    if not written or proc.returncode == 0:
        return not_replayable("the second prepare ended before its first shard was seen")
    return refused(sweep.train(where / "run", shards(out)), "manifest.json")


def prepare_stale_manifest(sweep, where: Path):
    """A shard of another prepare (the same record count) beside the first one's manifest."""
    a, b = text_lines(where / "a.txt", 200), text_lines(where / "b.txt", 200, "beta")
    for path, out in ((a, where / "out_a"), (b, where / "out_b")):
        if (proc := sweep.run(prepare(sweep, out, path))).rc != 0:
            return fail(f"prepare failed: {proc.tail()}")
    [shard] = (where / "out_b" / "sources_0").glob("*.array_record")
    shutil.copyfile(shard, where / "out_a" / "sources_0" / shard.name)
    return refused(sweep.train(where / "run", shards(where / "out_a")), shard.name)


def ids_past_vocab(sweep, where: Path):
    """A shard with token ids past the vocabulary, listed by a manifest naming this tokenizer
    (what a stale manifest of another tokenizer let through)."""
    from hanuman_jax.data import records

    out = where / "out" / "sources_0"
    out.mkdir(parents=True)
    tokens = [[1, 5, 9000 + i, 7, 2] * 20 for i in range(50)]
    shard = out / "shard-00000-of-00001.array_record"
    records.write_shard(shard, [records.encode(t, [1] * len(t)) for t in tokens])
    tokenizer = SAMPLE / "tokenizer.model"
    records.write_manifest(out, {
        "format": records.FORMAT, "tokenizer": str(tokenizer),
        "tokenizer_sha256": records.file_sha256(tokenizer), "vocab_size": 4096,
        "source": {"path": "forged"}, "documents": len(tokens), "tokens": 5000,
        "skipped": {}, "shards": [records.shard_entry(shard, len(tokens))],
    })  # fmt: skip
    return refused(sweep.train(where / "run", shards(where / "out")), "token id 9", "4096")


# --- 3, 5: a checkpoint changed on disk ---------------------------------------------------------


def flip_none_whole(sweep, where: Path):
    """The only checkpoint flipped: the resume stops, never starts over."""
    run = sweep.copy_run(where / "run")
    shutil.rmtree(run / "checkpoints" / "2")
    flip(run / "checkpoints" / "4")
    return refused(sweep.train(run), "none is whole")


def flip_fallback(sweep, where: Path):
    """The resume must restore step 2, say why, and set step 4 aside as 4.damaged."""
    run = sweep.copy_run(where / "run")
    flip(run / "checkpoints" / "4")
    proc = sweep.train(run)
    if not (result := succeeded(proc)).ok or not (result := trained_to(run, 4)).ok:
        return result
    if not (run / "checkpoints" / "4.damaged").is_dir():
        return fail("resumed from the flipped step 4 (not set aside as 4.damaged)")
    return result if "damaged" in proc.err else weak("fell back to step 2 without saying why")


def flip_export_step(sweep, where: Path):
    run = sweep.copy_run(where / "run")
    flip(run / "checkpoints" / "4")
    proc = sweep.cli("export", "--workdir", run, "--step", "4", "--out", where / "hf")
    return refused(proc, "damaged", "step 2")


def step_2(sweep, where: Path) -> tuple[Path, Path]:
    """A copy of the shared run, and an export of its step 2 (what a fallback must export)."""
    run = sweep.copy_run(where / "run")
    proc = sweep.cli("export", "--workdir", run, "--step", "2", "--out", where / "step_2")
    if proc.rc != 0:
        raise RuntimeError(f"step 2 did not export: {proc.tail()}")
    return run, where / "step_2"


def flip_export(sweep, where: Path):
    run, like = step_2(sweep, where)
    flip(run / "checkpoints" / "4")
    proc = sweep.cli("export", "--workdir", run, "--out", where / "hf")
    return fell_back(proc, where / "hf", like)


def meta_export(sweep, where: Path):
    """num_layers 2 -> 1 in step 4's metadata, its hash resealed: either step 2 (the newest whole
    one) exported, or a refusal naming the metadata; never a 1-layer model."""
    run, like = step_2(sweep, where)
    edit_layers(run / "checkpoints" / "4", reseal=True)
    proc = sweep.cli("export", "--workdir", run, "--out", where / "hf")
    return refused(proc, "meta/metadata") if proc.rc else fell_back(proc, where / "hf", like)


def meta_export_step(sweep, where: Path):
    run = sweep.copy_run(where / "run")
    edit_layers(run / "checkpoints" / "4", reseal=True)
    proc = sweep.cli("export", "--workdir", run, "--step", "4", "--out", where / "hf")
    result = refused(proc, "meta/metadata")
    if result.ok and (where / "hf").exists():
        return weak(f"refused, but left {where / 'hf'} behind")
    return result


def meta_generate(sweep, where: Path):
    run = sweep.copy_run(where / "run")
    edit_layers(run / "checkpoints" / "4", reseal=False)
    proc = sweep.cli("generate", "--workdir", run, "--step", "4", "--prompt", "Bangkok is",
                     "--max-new-tokens", "2")  # fmt: skip
    return refused(proc, "meta/metadata")


# --- 4: one trainer per workdir ---------------------------------------------------------------


def lock_live(sweep, where: Path):
    if (first := live_trainer(sweep, where)) is None:
        return fail(f"the first trainer ended: {log_tail(where / 'first.log')}")
    try:
        return refused(sweep.train(where / "run"), "in use by another trainer", str(first.pid))
    finally:
        kill(first)


def lock_killed(sweep, where: Path):
    if (first := live_trainer(sweep, where)) is None:
        return fail(f"the first trainer ended: {log_tail(where / 'first.log')}")
    kill(first)
    result = succeeded(sweep.train(where / "run"))
    return trained_to(where / "run", 4) if result.ok else result


# --- 6: torn lines a killed run leaves --------------------------------------------------------


def torn_samples(sweep, where: Path):
    run = resumable(sweep, where)
    with open(run / "samples.jsonl", "ab") as f:
        f.write(TORN)
    result = succeeded(sweep.train(run))
    return trained_to(run, 4) if result.ok else result


def torn_metrics(sweep, where: Path):
    run = resumable(sweep, where)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(TORN)
    if not (result := succeeded(sweep.train(run))).ok or not (result := trained_to(run, 4)).ok:
        return result
    (run / "metrics.png").unlink(missing_ok=True)
    if not (result := succeeded(sweep.cli("plot", "--workdir", run))).ok:
        return result
    return (
        ok("resumed, then plotted") if (run / "metrics.png").is_file() else fail("no metrics.png")
    )


def bad_byte_plot(sweep, where: Path):
    """An invalid byte mid-file (not a torn last line): plot skips the row or names it."""
    run = sweep.copy_run(where / "run")
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(2, b'{"step": 2, "loss": 1.0, "note": "\xff"}\n')
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    (run / "metrics.png").unlink(missing_ok=True)
    proc = sweep.cli("plot", "--workdir", run)
    if proc.rc != 0:
        return refused(proc, "metrics.jsonl")
    if not (result := succeeded(proc)).ok:
        return result
    return ok("plotted") if (run / "metrics.png").is_file() else fail("plot wrote no metrics.png")


# --- 7: sizes no device holds -------------------------------------------------------------------


def absurd(override: str):
    """A case: training with `override` stops in one line naming it, within QUICK_S."""
    name, value = override.removeprefix("--config.").split("=")

    def run(sweep, where: Path):
        proc = sweep.train(where / "run", override, timeout=120)
        result = refused(proc, f"{name.split('.')[-1]}={value}")
        if result.ok and proc.seconds > QUICK_S:
            return weak(f"refused after {proc.seconds:.0f} s: {result.reason}")
        return result

    return run


# --- weak: resumes with another config ----------------------------------------------------------


def lr_jump(sweep, where: Path):
    """The finished 4-step run resumed as a 40-step one: its rate would jump ~3x."""
    run = sweep.copy_run(where / "run")
    return refused(sweep.train(run, "--config.train.steps=40"), "learning rate",
                   "train.allow_lr_jump")  # fmt: skip


def lr_jump_allowed(sweep, where: Path):
    run = sweep.copy_run(where / "run")
    proc = sweep.train(run, "--config.train.steps=6", "--config.train.allow_lr_jump=true")
    result = succeeded(proc, "the learning rate goes from")
    return trained_to(run, 6) if result.ok else result


def batch_changed(sweep, where: Path):
    run = resumable(sweep, where)
    proc = sweep.train(run, "--config.train.batch_size=8")
    return undamaged(refused(proc, "train.batch_size 4 -> 8"), proc)


def source_added(sweep, where: Path):
    run = resumable(sweep, where)
    more = tiny_sources() + [{"path": str(SAMPLE / "english.txt"), "weight": 0.1}]
    proc = sweep.train(run, f"--config.data.sources={more!r}")
    return undamaged(refused(proc, "data.sources 4 entries -> 5"), proc)


def source_swapped(sweep, where: Path):
    """english.txt swapped for its lines in reverse order: as many records and bytes."""
    run = resumable(sweep, where)
    swapped = where / "english.txt"
    lines = (SAMPLE / "english.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    swapped.write_text("".join(reversed(lines)), encoding="utf-8")
    specs = tiny_sources()
    specs[0]["path"] = str(swapped)
    proc = sweep.train(run, f"--config.data.sources={specs!r}")
    if not (result := succeeded(proc)).ok:
        return result
    said = [line for line in proc.err.splitlines() if "data.sources[0]" in line and "chang" in line]
    return (
        ok(said[0][said[0].index("data.sources[0]") :])
        if said
        else fail("the data position was reused silently")
    )


# --- weak: disks that refuse writes -------------------------------------------------------------


def disk_full(sweep, where: Path):
    """A resume whose save of step 4 fills the disk (a tmpfs 2 MiB over the run's size)."""
    run, like = step_2(sweep, where)
    shutil.rmtree(run / "checkpoints" / "4")  # the resume trains steps 3-4 and saves step 4
    kib = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024 + 2048
    (mnt := where / "disk").mkdir()
    proc = in_namespace(sweep, FULL_DISK, mnt, kib, run, where / "after",
                        *sweep.train_cmd(mnt / "run"))  # fmt: skip
    if isinstance(proc, Result):
        return proc
    if not (result := refused(proc, "no space left", "step 2")).ok:
        return result
    after = sweep.cli("export", "--workdir", where / "after", "--out", where / "hf")
    if not succeeded(after).ok:
        return fail(f"the last good step did not survive: {after.tail()}")
    saved = exported(where / "hf", like)
    return ok(f"{result.reason}; then {saved.reason}") if saved.ok else saved


def export_read_only(sweep, where: Path):
    run = sweep.copy_run(where / "run")
    (mnt := where / "ro").mkdir()
    proc = in_namespace(sweep, READ_ONLY, mnt,
                        *sweep.module("export", "--workdir", run, "--out", mnt / "hf"))  # fmt: skip
    if isinstance(proc, Result):
        return proc
    return refused(proc, str(mnt))


def export_killed(sweep, where: Path):
    """export SIGKILLed as its weights appear; OUT must not be a half model, and the next export
    must leave nothing of the killed one behind."""
    run, parent = sweep.copy_run(where / "run"), where / "exports"
    parent.mkdir()
    out = parent / "tiny"
    proc = sweep.start(sweep.module("export", "--workdir", run, "--out", out), where / "kill.log")
    try:
        seen = wait_for(lambda: any(parent.rglob("*.safetensors")), proc, 300, every=0.002)
    finally:
        kill(proc)
    if not seen or proc.returncode == 0:
        return not_replayable("the export ended before its weights were seen")
    if (out / "config.json").exists():
        return fail(f"a killed export left a loadable half model: {sorted(os.listdir(out))}")
    killed = sorted(str(p.relative_to(parent)) for p in parent.rglob("*"))
    if not (result := succeeded(sweep.cli("export", "--workdir", run, "--out", out))).ok:
        return result
    if left := sorted(p.name for p in parent.iterdir() if p != out):
        return weak(f"the killed export's files are still beside OUT: {left}")
    saved = exported(out)
    return ok(f"killed with {killed[:3]} written; the next export is whole, with nothing "
              "left beside it") if saved.ok else saved  # fmt: skip


# --- weak: inputs -----------------------------------------------------------------------------


def bom(sweep, where: Path):
    """A UTF-8 byte-order mark at a JSONL file's start, trained with data.strict."""
    rows = [json.dumps({"text": f"Row {i}: the quick brown fox."}) for i in range(12)]
    (where / "bom.jsonl").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    proc = sweep.train(where / "run", sources(where / "bom.jsonl"), "--config.data.strict=true")
    result = succeeded(proc)
    return trained_to(where / "run", 4) if result.ok else result


def config_not_python(sweep, where: Path):
    (where / "tiny.json").write_text('{"train": {"steps": 4}}\n')
    proc = sweep.cli("train", "--config", where / "tiny.json", "--workdir", where / "run")
    return refused(proc, "tiny.json")


# fmt: off
CASES = (
    Case("nested-json-skip", "1", "a row nested 10,000 deep, trained in skip mode", nested_skip),
    Case("nested-json-strict", "1", "the same row with data.strict", nested_strict),
    Case("nested-json-tokenizer", "1", "the same row in `tokenizer train`", nested_tokenizer),
    Case("nested-json-prepare", "1", "the same row in `data prepare`", nested_prepare),
    Case("prepare-interrupted", "2", "`data prepare` again into its folder, SIGKILLed after its "
         "first new shard; then train", prepare_interrupted),
    Case("prepare-stale-manifest", "2", "a shard of another prepare beside the first one's "
         "manifest; then train", prepare_stale_manifest),
    Case("ids-past-vocab", "2", "a listed shard with token ids past the vocabulary; train",
         ids_past_vocab),
    Case("flip-resume", "3", "4 KB flipped in step 4's OCDBT data (same size); resume",
         flip_fallback),
    Case("flip-none-whole", "3", "the same, step 4 the only checkpoint; resume", flip_none_whole),
    Case("flip-export", "3", "the same; export the newest step", flip_export),
    Case("flip-export-step", "3", "the same; export --step 4", flip_export_step),
    Case("lock-live", "4", "a second trainer on a live workdir", lock_live),
    Case("lock-killed", "4", "the holder SIGKILLed; train again", lock_killed),
    Case("meta-export", "5", "num_layers 2 -> 1 in step 4's metadata, its hash resealed; export",
         meta_export),
    Case("meta-export-step", "5", "the same; export --step 4", meta_export_step),
    Case("meta-generate", "5", "the same edit, not resealed; generate --step 4", meta_generate),
    Case("torn-samples", "6", "samples.jsonl torn mid-character; resume", torn_samples),
    Case("torn-metrics", "6", "metrics.jsonl torn mid-character; resume, then plot",
         torn_metrics),
    *(Case(f"absurd-{flag.split('.')[-1].split('=')[0].replace('_', '-')}", "7",
           f"train with `{flag}`", absurd(f"--config.{flag}"))
      for flag in ("model.num_layers=100000", "train.batch_size=1000000000",
                   "model.vocab_size=10000000000", "model.d_model=10000000",
                   "train.steps=1000000000000")),
    Case("lr-jump", "weak", "the finished run resumed with train.steps 4 -> 40", lr_jump),
    Case("lr-jump-allowed", "weak", "4 -> 6 steps with train.allow_lr_jump", lr_jump_allowed),
    Case("batch-changed", "weak", "a resume with train.batch_size 4 -> 8", batch_changed),
    Case("source-added", "weak", "a resume with a fifth data source", source_added),
    Case("source-swapped", "weak", "a resume with english.txt's lines reversed (same count "
         "and bytes)", source_swapped),
    Case("disk-full", "weak", "a resume on a tmpfs that the save of step 4 fills", disk_full),
    Case("export-killed", "weak", "export SIGKILLed mid-write; export again", export_killed),
    Case("bom", "weak", "a JSONL file starting with a UTF-8 BOM, data.strict", bom),
    Case("export-read-only", "weak", "export into a read-only folder", export_read_only),
    Case("config-not-python", "weak", "--config on a JSON file", config_not_python),
    Case("metrics-bad-byte", "weak", "an invalid byte mid metrics.jsonl; plot", bad_byte_plot),
)
# fmt: on
