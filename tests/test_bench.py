"""The benchmark scripts run end to end on a small shape and report what BENCHMARKS.md quotes."""

import json
import subprocess
import sys

import pytest

SMALL = [
    "--config.model.num_layers=1",
    "--config.train.batch_size=2",
    "--config.data.seq_len=64",
]


def run_script(root, *args) -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_train_against_torch_reports_mfu_and_the_ratio_ceiling(root):
    pytest.importorskip("transformers")
    out, r = run_script(root, "scripts/bench_train.py", "--config", "configs/tiny.py",
                        "--steps", "2", "--rounds", "1", "--compare-torch", *SMALL)  # fmt: skip
    assert r["tokens_per_step"] == 2 * 64
    assert r["tokens_per_s"] == pytest.approx(128 / (r["step_ms"] / 1e3), rel=1e-3)
    assert r["torch_model"] == "MixtralForCausalLM"
    # both MFUs against the one measured peak, so ratio = ours / torch MFU, ceiling = 1 / torch's
    assert 0 < r["mfu_measured_peak"] < 1 and 0 < r["torch_mfu_measured_peak"] < 1
    assert r["ratio"] == pytest.approx(r["torch_step_ms"] / r["step_ms"], rel=1e-2)
    assert r["ratio"] == pytest.approx(
        r["mfu_measured_peak"] / r["torch_mfu_measured_peak"], rel=1e-2
    )
    assert r["ratio_ceiling"] * r["torch_mfu_measured_peak"] == pytest.approx(1, rel=1e-2)
    assert "ratio ours/torch" in out and "at most" in out


def test_bench_quality_trains_both_on_the_same_batches_and_scores_them_with_one_evaluator(
    root, tmp_path
):
    """Both runs end to end on the bundled sample: the same targets per step (else `failed`),
    evaluations at the same steps, and our trainer's held-out figure equal to its export's."""
    pytest.importorskip("transformers")
    plot = tmp_path / "quality.png"
    out, r = run_script(root, "scripts/bench_quality.py", "--config", "configs/tiny.py",
                        "--data", "bundled", "--steps", "6", "--eval-points", "2",
                        "--eval-batches", "1", "--plot", str(plot), *SMALL)  # fmt: skip
    assert r["failed"] == [] and r["evaluator_diff_bits_per_byte"] < 1e-3
    assert r["ours_trainer_bits_per_byte"] == r["ours_curve"][-1][2]
    assert [c[0] for c in r["ours_curve"]] == [c[0] for c in r["torch_curve"]] == [3, 6]
    assert r["ours_tokens"] == r["torch_tokens"] == 6 * 2 * 64
    assert r["torch_model"] == "MixtralForCausalLM" and r["vocab_size"] == 4096
    assert r["quality_ratio"] == pytest.approx(
        r["torch_bits_per_byte"] / r["ours_bits_per_byte"], abs=1e-4
    )
    assert r["torch_curve"][-1][2] == pytest.approx(r["torch_bits_per_byte"], abs=1e-5)
    assert r["torch_time_to_quality_s"] <= r["torch_wall_s"]
    if r["time_to_quality_ratio"] is None:
        assert "never reached" in r["time_to_quality_note"]
    else:
        assert r["time_to_quality_ratio"] == pytest.approx(
            r["torch_time_to_quality_s"] / r["ours_time_to_quality_s"], rel=0.05
        )
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert out.count(" ours step") == out.count("torch step") == 2


def test_bench_quality_torch_twin_learning_rate_packing_and_reach(root, monkeypatch):
    """The torch run's LambdaLR equals our optax schedule at every step; packed batches become
    transformers' arguments with our targets only; `reach` interpolates between evaluations."""
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(root / "scripts"))
    import ml_collections
    import numpy as np
    from bench_quality import reach
    from torch_baseline import packed_inputs, warmup_cosine

    from hanuman_jax.training.optim import lr_schedule

    for steps, fraction in ((300, 0.05), (10, 0.05), (7, 0.0), (9, 0.5)):
        cfg = ml_collections.ConfigDict({
            "optimizer": {"peak_lr": 3e-3, "min_lr_ratio": 0.1, "warmup_fraction": fraction},
            "train": {"steps": steps},
        })  # fmt: skip
        ours, factor = lr_schedule(cfg), warmup_cosine(cfg)
        for step in range(steps + 2):
            assert factor(step) * 3e-3 == pytest.approx(float(ours(step)), rel=1e-6), (steps, step)
    # two documents (the second from position 0), a padding tail, a prompt token without loss
    batch = {
        "tokens": np.array([[5, 6, 7, 8, 9, 0]]),
        "segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
        "positions": np.array([[0, 1, 2, 0, 1, 0]]),
        "loss_mask": np.array([[1, 1, 0, 1, 1, 0]]),
    }
    inputs = packed_inputs(batch, "cpu")
    assert inputs["labels"].tolist() == [[-100, 6, -100, -100, 9, -100]]
    assert inputs["position_ids"].tolist() == batch["positions"].tolist()
    batch["positions"] = np.array([[0, 1, 2, 3, 4, 0]])  # a document that torch would not see
    with pytest.raises(ValueError, match="position other than 0"):
        packed_inputs(batch, "cpu")
    curve = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.5)]
    assert reach(curve, 2.5) == pytest.approx(15.0)
    assert reach(curve, 1.5) == 30.0 and reach(curve, 3.5) == 10.0 and reach(curve, 1.0) is None


def test_bench_attention_checks_and_times_every_variant(root):
    _, r = run_script(root, "scripts/bench_attention.py", "--seq", "64", "--blocks", "16,64",
                      "--rounds", "1")  # fmt: skip
    assert set(r["ms"]) == {"all", "block_16", "block_64"}
    assert max(r["max_grad_diff"].values()) < 1e-4
    assert r["temp_bytes"]["block_16"] < r["temp_bytes"]["all"]


def test_bench_step_parts_times_every_part_of_ours_and_torchs_step(root):
    pytest.importorskip("transformers")
    out, r = run_script(root, "scripts/bench_step_parts.py", "--config", "configs/tiny.py",
                        "--rounds", "1", *SMALL)  # fmt: skip
    parts = {"step", "forward", "forward_backward", "ffn_layer", "attention_layer", "lm_head_ce",
             "optimizer"}  # fmt: skip
    for side in ("ms", "torch_ms"):
        assert set(r[side]) == parts and all(v > 0 for v in r[side].values()), r[side]
    assert len(r["loadavg_1m"]) == 1 and r["torch_threads"] >= 1
    assert r["tokens_per_step"] == 2 * 64 and r["matmul_gflop_per_step"] > 0
    assert set(r["by_difference_ms"]) == {"rest_of_forward_backward", "step_minus_forward_backward"}
    assert "optimizer update (clip + AdamW + guard)" in out


@pytest.mark.slow
def test_device_checks_smoke_runs_every_check_and_records_its_figures(root, tmp_path):
    """The GPU and TPU runs, prepared: every check of both, at tiny shapes on the CPU; splash and
    gmm in Pallas interpret mode, cuDNN skipped with its reason."""
    proc = subprocess.run(
        [sys.executable, "scripts/device_checks.py", "--out", str(tmp_path), "--smoke"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["failed"] == []
    lines = (tmp_path / "device_checks.jsonl").read_text().splitlines()
    records = {r["name"]: r for r in map(json.loads, lines)}
    assert list(records) == ["env", "attention", "experts", "moe", "plan", "gpu_preset",
                             "tpu_preset", "dense", "moe_blocked", "moe_xla"]  # fmt: skip
    assert all(r["rc"] == 0 and (tmp_path / f"{n}.log").exists() for n, r in records.items())
    env = {k: v for line in records["env"]["results"] for k, v in line.items()}
    assert env["backend"] == "cpu" and env["planner_device"] is None
    assert env["kernels"]["configs/colab_tpu.py"] == {
        "attention": "xla",
        "grouped_matmul": "blocked",
    }
    moe, dense = records["moe"]["results"][-1], records["dense"]["results"][-1]
    assert moe["config"] == "configs/hanuman_1b_moe.py" and moe["tokens_per_s"] > 0
    assert dense["config"] == "configs/bench_dense_05b.py" and 0 < dense["mfu_measured_peak"] < 1
    for name in ("moe_xla", "moe_blocked"):
        assert records[name]["results"][-1]["tokens_per_step"] == moe["tokens_per_step"]
    attention = records["attention"]["results"][-1]
    assert set(attention["ms"]) == {"all", "block_32", "splash"}
    assert (
        attention["interpret"] == ["splash"] and "cannot run here" in attention["skipped"]["cudnn"]
    )
    assert max(attention["max_grad_diff"].values()) < 1e-4
    assert max(attention["max_out_diff"].values()) < 1e-5
    kernels = {r["kernel"]: r for r in records["experts"]["results"]}
    assert set(kernels) == {"dense_same_flops", "blocked", "ragged_dot", "gmm"}
    assert [k for k, r in kernels.items() if r.get("auto")] == ["blocked"]  # auto's pick on CPU
    assert kernels["gmm"]["interpret"] and not kernels["ragged_dot"]["interpret"]
    for name in ("blocked", "ragged_dot", "gmm"):
        assert kernels[name]["max_grad_diff"] < 1e-4 and kernels[name]["max_out_diff"] < 1e-5
    assert records["plan"]["results"][-1]["planned_total"].endswith("MiB")
    for name in ("gpu_preset", "tpu_preset"):  # the real train CLI, its last metrics row
        last = records[name]["results"][-1]
        assert last["step"] == 2 and last["seq_len"] == 64 and last["tokens_per_s"] > 0
        assert (tmp_path / f"{name}.metrics.jsonl").exists()


def test_device_checks_pick_each_platforms_arguments_and_the_planners_device(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root / "scripts"))
    from device_check_list import CHECKS, DEVICE_FLAG, WORKDIR, planner_device
    from device_checks import fill

    def kernels(name, platform):
        argv = next(c for c in CHECKS if c.name == name).argv(platform, smoke=False)
        return argv[argv.index("--kernels") + 1]

    assert kernels("attention", "gpu") == "cudnn" and kernels("attention", "tpu") == "splash"
    assert "ragged_dot" in kernels("experts", "gpu") and "gmm" not in kernels("experts", "gpu")
    assert "gmm" in kernels("experts", "tpu")
    gpu = [c.name for c in CHECKS if c.argv("gpu", smoke=False)]
    tpu = [c.name for c in CHECKS if c.argv("tpu", smoke=True)]
    assert "gpu_preset" in gpu and "tpu_preset" not in gpu
    assert "tpu_preset" in tpu and "gpu_preset" not in tpu
    assert all(c.argv("cpu", smoke=True) for c in CHECKS)  # a CPU smoke runs every check
    assert planner_device("TPU v4", 4, "tpu") == "v4-8"
    assert planner_device("TPU v5 lite", 8, "tpu") == "v5e-8"
    assert planner_device("TPU v5", 4, "tpu") == "v5p-8"
    assert planner_device("NVIDIA A100-SXM4-80GB", 1, "gpu") == "a100-80"
    assert planner_device("NVIDIA A100-SXM4-40GB", 1, "gpu") == "a100"
    assert planner_device("NVIDIA H100 80GB HBM3", 2, "gpu") is None  # the planner's h100 is one
    argv = ["-m", "x", DEVICE_FLAG, "--workdir", WORKDIR]
    assert fill(argv, {"planner_device": "h100"}, root) == ["-m", "x", "--device=h100",
                                                           "--workdir", str(root)]  # fmt: skip
    assert fill(argv, {}, root) == ["-m", "x", "--workdir", str(root)]


def test_device_checks_skip_what_the_budget_cannot_hold(root, tmp_path):
    _, r = run_script(root, "scripts/device_checks.py", "--out", str(tmp_path), "--only",
                      "env,plan", "--budget-s", "1")  # fmt: skip
    assert r["failed"] == ["env", "plan"] and r["checks"] == 2
    records = [json.loads(x) for x in (tmp_path / "device_checks.jsonl").read_text().splitlines()]
    assert [x["rc"] for x in records] == ["skipped", "skipped"]


def test_bench_tokenizer_splits_retrains_at_the_supported_size_and_names_each_loss(root, tmp_path):
    """In-domain and leave-one-source-out splits on the first documents of ../shared/data; a
    vocabulary the small corpus cannot hold is retrained at the size SentencePiece names; the
    out-of-domain texts are read from --ood when present."""
    shared = root.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} is absent: the benchmark reads its corpora")
    ood = tmp_path / "ood"
    ood.mkdir()
    for name in ("udhr_th", "udhr_en", "wikipedia_titles_th"):
        (ood / f"{name}.txt").write_text("ทุกคนมีสิทธิ\nEveryone has the right\n", encoding="utf-8")
    args = ("--take", "400", "--ood", str(ood), "--no-parity")
    # a size the corpus holds is trained as asked (one small split: the time is in the pruning)
    _, exact = run_script(root, "scripts/bench_tokenizer.py", *args, "--vocab-sizes", "1000",
                          "--splits", "without_news")  # fmt: skip
    assert [(x["split"], x["trained_size"]) for x in exact["runs"]] == [("without_news", 1000)]
    indented = tmp_path / "indented.txt"
    indented.write_text("Licence\n    1. Definitions.\n        Deeper  still\n", encoding="utf-8")
    out, r = run_script(root, "scripts/bench_tokenizer.py", *args, "--vocab-sizes", "60000",
                        "--text", f"indented={indented}")  # fmt: skip
    runs = {x["split"]: x for x in r["runs"]}
    assert set(runs) == {"all", "without_news", "without_social", "without_english"}
    assert all(x["vocab_size"] == 60000 > x["trained_size"] for x in r["runs"])
    assert set(runs["all"]["ours"]) - {"train_s", "pieces"} == {
        "thai", "english", "wisesight_words", "udhr_th", "udhr_en", "wikipedia_titles_th",
        "indented",
    }  # fmt: skip
    assert runs["all"]["ours"]["indented"]["roundtrip"] == 1.0  # every space kept
    for clash in (("--text", f"udhr_en={indented}"), ("--text", f"x={indented}") * 2):
        proc = subprocess.run([sys.executable, "scripts/bench_tokenizer.py", *args, *clash],
                              cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2 and "the name is taken" in proc.stderr, proc.stderr[-500:]
    assert set(runs["without_social"]["ours"]) == {
        "social",
        "wisesight_words",
        "train_s",
        "pieces",
    }
    # one size for all three: the one the corpus supports
    for x, result in [(x, res) for res in (exact, r) for x in res["runs"]]:
        assert {x[k]["pieces"] for k in ("plain", "plain_byte_fallback", "ours")} == {
            x["trained_size"]
        }
        for name, row in x["ours"].items():
            if isinstance(row, dict) and "chars_per_token" in row:
                assert row["unk"] == 0 and row["roundtrip"] == 1.0, (x["split"], name, row)
        lost = [f"{x['vocab_size']} {x['split']} {loss}" for loss in x["behind"]]
        assert set(lost) <= set(result["behind"])
        for name, row in x["ours"].items():  # "behind" says exactly where plain is ahead
            plain = x["plain"].get(name, {})
            if isinstance(row, dict) and "chars_per_token" in row:
                assert (row["chars_per_token"] < plain["chars_per_token"]) == (
                    f"{name} chars/token" in x["behind"]
                )


def _script(root, name: str):
    sys.path.insert(0, str(root / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(root / "scripts"))


def test_bench_tokenizer_holds_out_no_line_it_trains_on(root):
    shared = root.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"{shared} is absent: the benchmark reads its corpora")
    train, held = _script(root, "bench_tokenizer").split_corpus(shared, take=2000)
    trained = {line for lines in train.values() for line in lines}
    assert all(held.values()) and not any(x in trained for v in held.values() for x in v)
    # the news sign-offs repeated in every article are trained on, never held out
    assert "กลุ่มประชาสัมพันธ์และเผยแพร่ สำนักโฆษก" in trained


def test_bench_tokenizer_passes_balance_and_trainer_options_to_ours_and_each_variant(
    root, tmp_path, monkeypatch
):
    bench = _script(root, "bench_tokenizer")
    assert bench.trainer_option("split_by_unicode_script=false") == (
        "split_by_unicode_script",
        False,
    )
    assert bench.trainer_option("num_sub_iterations=1") == ("num_sub_iterations", 1)
    assert bench.trainer_option("x=a b") == ("x", "a b")
    with pytest.raises(bench.argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        bench.trainer_option("num_sub_iterations")
    (tmp_path / "t.txt").write_text("one\n  two\n", encoding="utf-8")
    assert bench.text_file(f"t={tmp_path / 't.txt'}") == ("t", ["one", "  two"])
    with pytest.raises(bench.argparse.ArgumentTypeError, match="expected NAME=FILE"):
        bench.text_file(str(tmp_path / "t.txt"))
    with pytest.raises(bench.argparse.ArgumentTypeError, match="cannot read .*missing.txt"):
        bench.text_file(f"t={tmp_path / 'missing.txt'}")
    seen = {}
    monkeypatch.setattr(bench, "train_plain", lambda files, prefix, n, **kw: prefix.name)
    monkeypatch.setattr(
        bench, "train_ours", lambda files, prefix, n, **kw: seen.setdefault(prefix.name, kw)
    )
    variants = {
        "a": {"balance": 1.0},
        "b": {"options": {"num_sub_iterations": 2, "byte_fallback": False}},
    }
    train = {s: ["ก"] for s in bench.SOURCES}
    base = {"balance": 0.5, "options": {"num_sub_iterations": 1}}
    out = bench.run_split("all", train, tmp_path, 100, variants, seed=3, base=base)
    assert base == {"balance": 0.5, "options": {"num_sub_iterations": 1}}  # not changed
    assert out["vocab_size"] == 100 and set(out) == {
        "vocab_size",
        "plain",
        "plain_byte_fallback",
        "ours",
        "a",
        "b",
    }
    assert seen == {
        "ours_0": {"balance": 0.5, "options": {"num_sub_iterations": 1}, "seed": 3},
        "ours_1": {"balance": 1.0, "options": {"num_sub_iterations": 1}, "seed": 3},
        "ours_2": {
            "balance": 0.5,
            "options": {"num_sub_iterations": 2, "byte_fallback": False},
            "seed": 3,
        },
    }


def test_ood_text_reads_the_udhr_pages_and_needs_every_split(root, tmp_path):
    ood_text = _script(root, "ood_text")
    page = (
        "<html><h4>Article 1</h4>\n<p>All human beings are born&nbsp;free\n and equal.</p></html>"
    )
    assert ood_text.html_paragraphs(page) == [
        "Article 1",
        "All human beings are born free and equal.",
    ]
    assert ood_text.load(tmp_path) is None
    for name in ood_text.SPLITS:
        (tmp_path / f"{name}.txt").write_text("a\nb\n", encoding="utf-8")
    assert ood_text.load(tmp_path) == {name: ["a", "b"] for name in ood_text.SPLITS}
