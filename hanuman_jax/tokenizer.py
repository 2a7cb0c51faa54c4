"""SentencePiece Unigram tokenizer with byte fallback, NFC and the project's special symbols."""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

# Fixed ids: <unk> 0, then the control symbols, then the user symbols in this order (ids 4-10).
UNK, BOS, EOS, PAD = "<unk>", "<bos>", "<eos>", "<pad>"
NEWLINE = "<nl>"
USER_SYMBOLS = (NEWLINE, "<lang_en>", "<lang_th>", "<lang_xx>", "<translate>", "<copy>", "<sep>")
ROLES = ("system", "user", "assistant")


def normalize(text: str) -> str:
    """NFC, and newlines as the `<nl>` symbol so that they survive SentencePiece."""
    text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\n", NEWLINE)


class Tokenizer:
    """Encode/decode text and chats; the special ids every other module uses."""

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.nl_id = self.sp.piece_to_id(NEWLINE)
        self.sep_id = self.sp.piece_to_id("<sep>")
        if min(self.bos_id, self.eos_id, self.pad_id) < 0 or self.nl_id == self.sp.unk_id():
            raise ValueError(
                f"tokenizer model {self.path} lacks <bos>/<eos>/<pad>/<nl>; "
                "train it with hanuman_jax.tokenizer.train_tokenizer"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(normalize(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids]).replace(NEWLINE, "\n")

    def encode_document(self, text: str) -> list[int]:
        """`<bos>` + text + `<eos>`: the unit that the data pipeline packs."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def encode_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Chat template: per turn `<sep>` role `<nl>` content, then `<eos>`.

        Returns ids and the loss mask: 1 on an assistant reply and on the token that ends it (the
        next turn's `<sep>` or the final `<eos>`), so the model learns to stop.
        """
        ids, mask = [self.bos_id], [0]
        previous = None
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(
                    f"chat message {i} must have role in {ROLES} and string content, got "
                    f"{ {k: type(v).__name__ for k, v in message.items()} }"
                )
            header = [self.sep_id, *self.encode(role), self.nl_id]
            body = self.encode(content)
            ids += header + body
            mask += [int(previous == "assistant")] + [0] * (len(header) - 1)
            mask += [int(role == "assistant")] * len(body)
            previous = role
        ids.append(self.eos_id)
        mask.append(int(previous == "assistant"))
        return ids, mask


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    seed_sentencepiece_size: int = 1_000_000,
) -> Path:
    """Trains a byte-fallback Unigram model on normalized sentences; returns the .model path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(normalize(s) for s in sentences if s.strip()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",  # NFC is applied by `normalize`, identically at encode
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        user_defined_symbols=list(USER_SYMBOLS),
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=2,
        minloglevel=2,
    )
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
