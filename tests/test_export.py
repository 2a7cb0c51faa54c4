"""Export to and import from Hugging Face: transformers computes what we compute.

A tiny dense model (untied, llama3 RoPE) trained 3 steps in-process and a tiny MoE (tied, linear
RoPE) trained 3 steps on 8 simulated devices (data x fsdp x expert = 2 x 2 x 2, in a subprocess:
so the MoE export also reads a checkpoint written on a mesh) are exported and compared with
transformers on Thai and English: logits, greedy continuations, the fp16 export's top-1 tokens
and `evaluate`'s loss. Random transformers Llama and Mixtral models check the import.
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hanuman_jax.checkpoint.restore import load_params
from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.hf.export import export
from hanuman_jax.hf.export import main as export_main
from hanuman_jax.hf.importer import import_hf
from hanuman_jax.hf.importer import write_checkpoint as import_checkpoint
from hanuman_jax.hf.mapping import model_config_from_hf
from hanuman_jax.inference.evaluate import evaluate
from hanuman_jax.inference.generate import generate_ids, prompt_ids, sample, stop_ids
from hanuman_jax.model.build import inference_config, model_from_params
from hanuman_jax.planning.targets import Target
from hanuman_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "hanuman_jax" / "assets" / "sample"
SMALL = [  # odd sizes: 6 heads of 8 over 2 key/value heads, 40 hidden
    "--config.model.num_layers=2", "--config.model.d_model=48", "--config.model.num_heads=6",
    "--config.model.num_kv_heads=2", "--config.model.ffn_hidden=40",
    "--config.model.max_seq_len=128", "--config.data.seq_len=64", "--config.train.batch_size=4",
    "--config.train.steps=3", "--config.train.log_every=1",
]  # fmt: skip
KINDS = {
    "moe": ["--config.model.moe.num_experts=6", "--config.model.rope.scaling=linear",
            "--config.model.rope.factor=2.0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.expert=2", "--config.train.batch_size=8"],
    "dense": ["--config.model.moe.num_experts=0", "--config.model.tie_embeddings=false",
              "--config.model.rope.scaling=llama3", "--config.model.rope.factor=4.0",
              "--config.model.rope.original_context=32", "--config.model.rope.theta=5000.0"],
}  # fmt: skip


def _lines(name: str, count: int, min_chars: int = 60) -> list[str]:
    lines = (SAMPLE / name).read_text(encoding="utf-8").splitlines()
    return [x for x in lines if len(x) >= min_chars][:count]


TEXTS = _lines("english.txt", 2) + _lines("thai.txt", 2)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Workdirs of the two tiny models. The MoE trains in a subprocess on 8 simulated devices,
    started at once when a test here needs it, so that it overlaps the tests before it."""
    from hanuman_jax.training.loop import train

    done: dict[str, Path] = {}
    moe_dir = tmp_path_factory.mktemp("moe")
    wanted = any(
        i.path == request.path and i.get_closest_marker("slow") for i in request.session.items
    )
    proc = None
    if wanted:
        cmd = [sys.executable, "-m", "hanuman_jax.train", "--config", "configs/tiny.py",
               "--workdir", str(moe_dir), "--no_progress", *SMALL, *KINDS["moe"]]  # fmt: skip
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
        log = open(moe_dir / "train.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def get(kind: str) -> Path:
        if kind in done:
            return done[kind]
        if kind == "moe":
            assert proc is not None and proc.wait(timeout=600) == 0, (
                moe_dir / "train.log"
            ).read_text()[-3000:]
            assert json.loads((moe_dir / "config.json").read_text())["mesh"]["expert"] == 2
            done[kind] = moe_dir
        else:
            done[kind] = tmp_path_factory.mktemp(kind)
            train(load_config(ROOT / "configs" / "tiny.py", SMALL + KINDS[kind]), done[kind],
                  progress=False)  # fmt: skip
        return done[kind]

    yield get
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _ours(loaded, *ids: list[int]) -> list[np.ndarray]:
    """Our logits of each sequence: one jitted call, the sequences padded to the same length."""
    cfg = inference_config(loaded.model_cfg, Target("cpu"))
    tokens = np.zeros((2, len(ids), max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
        tokens[:, i, : len(x)] = [x, np.ones(len(x))]  # ids, and segment 1 where not padding
    logits = jax.jit(lambda p, t, s: model_from_params(cfg, p)(t, s)[0])(loaded.params, *tokens)
    return [np.asarray(logits[i, : len(x)]) for i, x in enumerate(ids)]


def _hf(path, dtype=None):
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **kwargs
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    return _hf_forward(model, ids)[0]


def _hf_forward(model, ids: list[int]) -> tuple[np.ndarray, float]:
    """Logits, and transformers' loss with labels = inputs (the mean over every token but the
    first)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    return out.logits[0].float().numpy(), out.loss.item()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, not stopping at <eos> (generate fills an unset eos from the model's)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def _check_export(kind: str, workdir: Path, tmp_path: Path) -> None:
    loaded = load_params(workdir)
    out = export(workdir, tmp_path / "fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM" if kind == "moe" else
                                       "LlamaForCausalLM"]  # fmt: skip
    model = _hf(out)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer = Tokenizer(loaded.tokenizer)
    ids = [prompt_ids(tokenizer, t) + [tokenizer.eos_id] for t in TEXTS]
    assert [hf_tokenizer(t).input_ids + [tokenizer.eos_id] for t in TEXTS] == ids

    _check_chat(out, loaded, tokenizer, model)

    ours = _ours(loaded, *ids)
    theirs, losses = zip(*[_hf_forward(model, x) for x in ids], strict=True)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
    print(f"{kind}: max |logit diff| vs transformers fp32 = {diff:.2e}")
    assert diff < 1e-4

    # evaluate's loss is transformers' loss (labels = inputs: every token after <bos>)
    result = evaluate(loaded.params, loaded.model_cfg, tokenizer, TEXTS)
    assert result["tokens"] == sum(len(x) - 1 for x in ids)
    nll = sum(loss * (len(x) - 1) for loss, x in zip(losses, ids, strict=True))
    assert result["loss"] == pytest.approx(nll / result["tokens"], abs=1e-4)

    # greedy continuations, English and Thai: one left-padded batch against transformers
    prompts = [ids[0][:9], ids[2][:14]]
    greedy = generate_ids(loaded.params, loaded.model_cfg, prompts, max_new_tokens=32)
    assert greedy == [_hf_greedy(model, p, 32) for p in prompts]

    fp16 = _hf(export(workdir, tmp_path / "fp16", dtype="float16"), torch.float16)
    top1 = [
        np.argmax(a, -1) == np.argmax(_hf_logits(fp16, x), -1)
        for a, x in zip(ours, ids, strict=True)
    ]
    agree = np.mean(np.concatenate(top1))
    print(f"{kind}: fp16 export top-1 agreement {agree:.4f}")
    assert agree >= 0.99


def _check_chat(out: Path, loaded, tokenizer: Tokenizer, model) -> None:
    """The export's chat template gives `generate --chat`'s prompt, and transformers' greedy reply,
    stopping where generation_config.json says, is ours; scripts/serve_t4.py --chat prints it."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = TEXTS[3][:40]
    turn = [{"role": "user", "content": text}]
    ids = hf_tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
    assert ids == prompt_ids(tokenizer, text, chat=True)
    assert model.generation_config.eos_token_id == list(stop_ids(tokenizer))
    with torch.no_grad():
        reply = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    reply = reply[0, len(ids) :].tolist()
    assert reply == generate_ids(loaded.params, loaded.model_cfg, [ids], max_new_tokens=12,
                                 stop_ids=stop_ids(tokenizer))[0]  # fmt: skip
    spec = importlib.util.spec_from_file_location("serve_t4", ROOT / "scripts" / "serve_t4.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        serve.main(["--model", str(out), "--prompt", text, "--chat", "--dtype", "float32",
                    "--max-new-tokens", "12"])  # fmt: skip
    said = hf_tokenizer.decode(reply, skip_special_tokens=True)
    assert printed.getvalue() == f"--- {text} (cpu, float32)\n{said}\n"
    # a text prompt's continuation keeps the space it starts with, as `generate` prints it
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        serve.main(["--model", str(out), "--prompt", text, "--dtype", "float32",
                    "--max-new-tokens", "12"])  # fmt: skip
    said = sample(loaded.params, loaded.model_cfg, tokenizer, [text], max_new_tokens=12)[0]
    assert printed.getvalue() == f"--- {text} (cpu, float32)\n{said}\n"


def test_dense_export_equals_transformers(runs, tmp_path):
    _check_export("dense", runs("dense"), tmp_path)


def _random_hf(kind: str, path: Path) -> Path:
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=40, intermediate_size=36, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.1, rms_norm_eps=1e-6)  # fmt: skip
    if kind == "llama":  # head_dim != hidden / heads, untied, llama3 RoPE
        config = transformers.LlamaConfig(
            **common, head_dim=12, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:  # tied, linear RoPE
        config = transformers.MixtralConfig(
            **common, num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_import_transformers_model(kind, tmp_path):
    hf_dir = _random_hf(kind, tmp_path / "hf")
    model = _hf(hf_dir)
    step_dir, _ = import_hf(hf_dir, tmp_path / "run")
    loaded = load_params(step_dir.parents[1])
    ids = [int(i) for i in np.random.default_rng(0).integers(4, 97, 40)]
    diff = float(np.abs(_ours(loaded, ids)[0] - _hf_logits(model, ids)).max())
    print(f"imported {kind}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < 1e-4
    if kind == "llama":  # (the MoE's greedy decoding is compared on the trained one)
        greedy = generate_ids(loaded.params, loaded.model_cfg, [ids[:7]], max_new_tokens=32)[0]
        assert greedy == _hf_greedy(model, ids[:7], 32)
        assert len(set(greedy)) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias=true"),
        ({"sliding_window": 64}, "sliding_window=64"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "qwen2"}, "model_type='qwen2' is not supported"),
    ],
)
def test_import_refuses_what_it_cannot_compute_exactly(change, message):
    base = {"model_type": "mistral", "vocab_size": 97, "hidden_size": 40, "intermediate_size": 36,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "sliding_window": None}  # fmt: skip
    assert model_config_from_hf(base).num_kv_heads == 2
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        model_config_from_hf(base | change)


def test_export_errors_and_shards(runs, tmp_path, capsys):
    workdir = runs("dense")
    with pytest.raises(
        ConfigError, match=rf"does not exist; runs with checkpoints in .*: .*{workdir.name}"
    ):
        export(workdir.parent / "no_such_run", tmp_path / "x")
    with pytest.raises(ConfigError, match="no checkpoint for step 7; saved steps: 3"):
        export(workdir, tmp_path / "x", step=7)
    assert export_main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err

    out = tmp_path / "sharded"
    assert export_main(["--workdir", str(workdir), "--out", str(out)]) == 0
    # readable as the other files are (safetensors alone writes 0600: a server user could not)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    whole = _hf_logits(_hf(out), [1, 5, 900, 7])
    export(workdir, out, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    np.testing.assert_array_equal(_hf_logits(_hf(out), [1, 5, 900, 7]), whole)


def test_export_and_import_without_torch(runs, tmp_path):
    """`python -m hanuman_jax.export --dtype bfloat16` and `python -m hanuman_jax.import_hf` run
    where torch and transformers cannot be imported (as after `pip install -e .`); then the bf16
    weights are torch's rounding of the float32 export, AutoTokenizer reads the tokenizer files,
    and transformers on the export computes what the imported checkpoint computes in JAX."""
    from safetensors.torch import load_file

    hidden = tmp_path / "hidden"  # first on the path: `import torch` finds these and fails
    for name in ("torch", "transformers"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    workdir, out, imported = runs("dense"), tmp_path / "bf16", tmp_path / "imported"
    export_args = ["--workdir", str(workdir), "--out", str(out), "--dtype", "bfloat16"]
    import_args = ["--model", str(out), "--out", str(imported)]
    for args in (["hanuman_jax.export", *export_args], ["hanuman_jax.import_hf", *import_args]):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    bf16 = load_file(out / "model.safetensors")
    fp32 = load_file(export(workdir, tmp_path / "fp32") / "model.safetensors")
    assert sorted(bf16) == sorted(fp32)
    for name, x in fp32.items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], x.bfloat16()), name
    loaded = load_params(imported)
    tokenizer = Tokenizer(loaded.tokenizer)
    ids = prompt_ids(tokenizer, TEXTS[2])
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXTS[2]).input_ids == ids
    diff = float(np.abs(_ours(loaded, ids)[0] - _hf_logits(_hf(out, torch.float32), ids)).max())
    assert diff < 1e-4


def _imported_run(tmp_path: Path) -> Path:
    """A run of one checkpoint of random weights (no training: fast), with our tokenizer."""
    from conftest import random_params, small_model_cfg

    cfg = small_model_cfg()
    import_checkpoint(random_params(cfg), cfg, tmp_path / "run", step=1,
                      tokenizer=SAMPLE / "tokenizer.model")  # fmt: skip
    return tmp_path / "run"


def test_a_killed_export_leaves_no_half_model(tmp_path, monkeypatch):
    """OUT appears whole or not at all: the export is written beside it and renamed into place;
    what a killed export left there is removed by the next."""
    from hanuman_jax.hf import export as hf_export

    run, out = _imported_run(tmp_path), tmp_path / "hf"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the weights, before the tokenizer

    monkeypatch.setattr(hf_export, "export_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        export(run, out)
    assert not out.exists()
    monkeypatch.undo()
    stale = tmp_path / ".hf.exporting"  # as a SIGKILL leaves it
    stale.mkdir()
    (stale / "model.safetensors.tmp").write_bytes(b"\0" * 1000)
    export(run, out)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_export_keeps_the_users_files_and_refuses_what_it_cannot_write(tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    run, out = _imported_run(tmp_path), tmp_path / "hf"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "model.safetensors").write_text("mine")
    with pytest.raises(ConfigError, match=f"--out {notes}: holds files but no config.json"):
        export(run, notes)
    assert [p.name for p in notes.iterdir()] == ["model.safetensors"]

    export(run, out)
    (out / "README.md").write_text("my model card")
    export(run, out, max_shard_bytes=20_000)  # a second export replaces the first's files only
    assert (out / "README.md").read_text() == "my model card"
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()

    capsys.readouterr()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the mode bits would for a user
        monkeypatch.setattr(os, "access", lambda p, mode: not (Path(p) == out and mode & os.W_OK))
    try:
        assert export_main(["--workdir", str(run), "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert f"error: --out {out}: cannot write in {out} (read-only)\n" == err, err
    assert (out / "model.safetensors.index.json").is_file()
    assert not (tmp_path / ".hf.exporting").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda text: "[" + text[1:], "meta/metadata is not valid JSON"),
        (lambda text: text.replace('"num_layers": 2, ', ""), "model.num_layers is missing"),
        (lambda text: text.replace('"model"', '"modl"'), "meta/metadata holds no config.model"),
        # the same size, and its manifest rewritten: the saved arrays tell the edit
        (lambda text: text.replace('"num_layers": 2', '"num_layers": 1'),
         "state holds params.layers.1.attn.wk (48, 2, 8), which the model in meta/metadata"),
    ],
)  # fmt: skip
def test_edited_metadata_is_one_line_in_export_generate_and_evaluate(tmp_path, capsys, edit, says):
    from conftest import random_params, small_model_cfg

    from hanuman_jax.checkpoint.files import seal
    from hanuman_jax.inference.evaluate import main as evaluate_main
    from hanuman_jax.inference.generate import main as generate_main

    cfg = small_model_cfg()
    step_dir = import_checkpoint(random_params(cfg), cfg, tmp_path / "run", step=1,
                                 tokenizer=SAMPLE / "tokenizer.model")  # fmt: skip
    meta_file = step_dir / "meta" / "metadata"
    meta_file.write_text(edit(meta_file.read_text()))
    seal(step_dir, None)
    for main, args in [(export_main, ["--out", str(tmp_path / "hf"), "--step", "1"]),
                       (generate_main, ["--prompt", "hello"]),
                       (evaluate_main, ["--input", str(SAMPLE / "english.txt")])]:  # fmt: skip
        assert main(["--workdir", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
        assert str(step_dir.parent) in errors[0]
    assert not (tmp_path / "hf" / "config.json").exists()


def _vllm_weights(c: dict) -> dict[str, tuple[int, ...]]:
    """The tensors vLLM's MixtralForCausalLM / LlamaForCausalLM `load_weights` read (per-expert
    `experts.E.w1/w2/w3`, stacked there into its fused MoE), with their [out, in] shapes."""
    D, H, V, F = c["hidden_size"], c["head_dim"], c["vocab_size"], c["intermediate_size"]
    NH, KH = c["num_attention_heads"] * H, c["num_key_value_heads"] * H
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c["tie_word_embeddings"]:
        names["lm_head.weight"] = (V, D)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (NH, D),
            p + "self_attn.k_proj.weight": (KH, D),
            p + "self_attn.v_proj.weight": (KH, D),
            p + "self_attn.o_proj.weight": (D, NH),
        }
        if c["model_type"] == "llama":
            names |= {
                p + "mlp.gate_proj.weight": (F, D),
                p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F),
            }
            continue
        names[p + "block_sparse_moe.gate.weight"] = (c["num_local_experts"], D)
        for e in range(c["num_local_experts"]):
            x = f"{p}block_sparse_moe.experts.{e}."
            names |= {x + "w1.weight": (F, D), x + "w3.weight": (F, D), x + "w2.weight": (D, F)}
    return names


@pytest.mark.parametrize("experts", [5, 0])
def test_export_is_what_vllm_loads(experts, tmp_path):
    """vLLM cannot run here, so this checks what it reads: a stock config class (no custom code),
    the weights its Mixtral and Llama loaders take, the tokenizer with its chat template, and
    the tokens that end a reply."""
    from conftest import random_params, small_model_cfg
    from safetensors import safe_open

    from hanuman_jax.config import MoeConfig
    from hanuman_jax.tokenizer.hf import chat_template

    tokenizer = Tokenizer(SAMPLE / "tokenizer.model")
    cfg = small_model_cfg(vocab_size=tokenizer.vocab_size, tie_embeddings=not experts,
                          moe=MoeConfig(num_experts=experts, top_k=2))  # fmt: skip
    import_checkpoint(random_params(cfg), cfg, tmp_path / "run", step=1,
                      tokenizer=SAMPLE / "tokenizer.model")  # fmt: skip
    out = export(tmp_path / "run", tmp_path / "hf", dtype="float16")  # a T4 serves float16

    config = json.loads((out / "config.json").read_text())
    stock = transformers.MixtralConfig if experts else transformers.LlamaConfig
    assert type(transformers.AutoConfig.from_pretrained(out)) is stock
    assert config["architectures"] == [stock.__name__.replace("Config", "ForCausalLM")]
    # every key is the stock class's, or transformers 4's spelling of one (for older vLLMs)
    assert set(config) - set(stock().to_dict()) <= {"rope_theta", "rope_scaling", "torch_dtype"}
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert shapes == _vllm_weights(config)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    # the bundled tokenizer puts a space before every text
    assert hf_tokenizer.chat_template == chat_template(dummy_prefix=True)
    assert len(hf_tokenizer) <= config["vocab_size"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 10], "pad_token_id": 3}
    assert hf_tokenizer.convert_ids_to_tokens([2, 10, 3]) == ["<eos>", "<sep>", "<pad>"]


# The MoE trains in the background meanwhile; the tests that need it come last.
@pytest.mark.slow
def test_moe_export_equals_transformers(runs, tmp_path):
    _check_export("moe", runs("moe"), tmp_path)


@pytest.mark.slow
def test_export_import_export_is_bit_identical(runs, tmp_path):
    first = export(runs("moe"), tmp_path / "first")
    workdir = import_hf(first, tmp_path / "imported")[0].parents[1]
    loaded = load_params(workdir)
    assert loaded.model_cfg.moe.router_temperature == 1.0  # folded into the gate weights
    second = export(workdir, tmp_path / "second")
    a = safetensors_numpy.load_file(first / "model.safetensors")
    b = safetensors_numpy.load_file(second / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
