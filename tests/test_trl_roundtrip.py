"""The Hugging Face fine-tuning round trip: a tiny stage C run, exported, fine-tuned by TRL's
`SFTTrainer` on the bundled chats with the export's chat template (loss on the replies only),
imported back with `python -m hanuman_jax.import_hf`, decodes a chat greedily as transformers
decodes it with the fine-tuned model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from safetensors.numpy import load_file  # noqa: E402

from hanuman_jax.checkpoint.restore import load_params  # noqa: E402
from hanuman_jax.config import load_config  # noqa: E402
from hanuman_jax.hf.export import export  # noqa: E402
from hanuman_jax.inference.generate import generate_ids, prompt_ids, stop_ids  # noqa: E402
from hanuman_jax.tokenizer import Tokenizer  # noqa: E402
from hanuman_jax.training.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "hanuman_jax" / "assets" / "sample"
MAX_LENGTH = 128  # TRL's max_length; only chats that fit are used, so none loses its reply
# stage C at test size, from scratch; initialised wide, so that 3 steps leave a model whose greedy
# replies change with the prompt (a reply of one repeated token would compare little)
TINY_C = ["--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
          "--config.train.batch_size=4", "--config.train.steps=3", "--config.train.log_every=1",
          "--config.train.init_from=", "--config.model.init_std=0.3"]  # fmt: skip


def _chats(tokenizer: Tokenizer, count: int) -> list[list[dict]]:
    """The first `count` bundled chats of at most MAX_LENGTH tokens."""
    lines = (SAMPLE / "chat.jsonl").read_text("utf-8").splitlines()
    chats = [json.loads(line)["messages"] for line in lines]
    return [c for c in chats if len(tokenizer.encode_chat(c)[0]) <= MAX_LENGTH][:count]


def _sft(hf_dir: Path, chats: list[list[dict]], tokenizer: Tokenizer, out: Path) -> Path:
    """Fine-tunes the export at `hf_dir` for 4 steps with TRL on `chats`; returns the saved
    model's folder. TRL's labels are checked to be `encode_chat`'s loss mask first."""
    config = trl.SFTConfig(
        output_dir=str(out / "trl"), max_steps=4, per_device_train_batch_size=2,
        learning_rate=1e-3, max_length=MAX_LENGTH, assistant_only_loss=True, use_cpu=True,
        bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(hf_dir),
        args=config,
        train_dataset=datasets.Dataset.from_list([{"messages": c} for c in chats]),
        processing_class=transformers.AutoTokenizer.from_pretrained(hf_dir),
    )
    for row, chat in zip(trainer.train_dataset, chats, strict=True):
        ids, mask = tokenizer.encode_chat(chat)
        assert row["input_ids"] == ids
        assert row["labels"] == [i if m else -100 for i, m in zip(ids, mask, strict=True)]
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses)), trainer.state.log_history
    trainer.save_model(str(out / "tuned"))
    return out / "tuned"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's
def test_trl_sft_round_trip(tmp_path):
    run = tmp_path / "stage_c"
    train(load_config(ROOT / "configs" / "tiny_stage_c.py", TINY_C), run, progress=False)
    hf_dir = export(run, tmp_path / "hf")
    tokenizer = Tokenizer(load_params(run).tokenizer)
    chats = _chats(tokenizer, 8)
    assert any(c[0]["role"] == "system" for c in chats) and max(map(len, chats)) >= 4

    tuned = _sft(hf_dir, chats, tokenizer, tmp_path)
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))  # every tensor trained

    # TRL saves the tokenizer with save_pretrained (tokenizer.json and chat_template.jinja), which
    # leaves out the SentencePiece model that a checkpoint of ours carries: --tokenizer names it
    assert not (tuned / "tokenizer.model").exists()
    back = tmp_path / "imported"
    cmd = [sys.executable, "-m", "hanuman_jax.import_hf", "--model", str(tuned), "--out", str(back),
           "--tokenizer", str(hf_dir / "tokenizer.model")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--config.data.tokenizer=" in proc.stdout
    loaded = load_params(back)
    assert loaded.tokenizer.read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    # what was imported is what TRL saved, bit for bit
    again = load_file(export(back, tmp_path / "again") / "model.safetensors")
    assert again.keys() == after.keys()
    assert all(np.array_equal(again[k], after[k]) for k in after)

    model = transformers.AutoModelForCausalLM.from_pretrained(tuned).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tuned)
    assert model.generation_config.eos_token_id == list(stop_ids(tokenizer))
    texts = [next(m["content"] for m in c if m["role"] == "user") for c in chats[:3]]
    prompts = [prompt_ids(tokenizer, text, chat=True) for text in texts]
    ours = generate_ids(loaded.params, loaded.model_cfg, prompts, max_new_tokens=12,
                        stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_id)  # fmt: skip
    for text, ids, reply in zip(texts, prompts, ours, strict=True):
        turn = [{"role": "user", "content": text}]
        assert hf_tokenizer.apply_chat_template(turn, add_generation_prompt=True,
                                                return_dict=False) == ids  # fmt: skip
        with torch.no_grad():
            theirs = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert reply == theirs[0, len(ids) :].tolist(), text
        assert len(set(reply)) > 3, reply
