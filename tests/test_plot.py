import json

from hanuman_jax.plot import _length_changes, main, read_metrics


def _write_run(workdir, with_eval: bool):
    rows = [{"step": s, "loss": 8.0 / s, "lr": 1e-3 * min(1, s / 5), "tokens_per_s": 5000.0 + s,
             "seq_len": 64 if s < 20 else 128} for s in (1, 10, 20, 30)]  # fmt: skip
    if with_eval:
        rows.insert(3, {"step": 20, "eval_loss": 3.1, "eval_perplexity": 22.2, "eval_tokens": 99})
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(2, b"\xff\xfe")  # an invalid byte mid-file: the rows around it still read
    killed = b'{"step": 40, "loss": 1.\x00\x00'  # a killed run's last line, a zero-filled tail
    (workdir / "metrics.jsonl").write_bytes(b"\n".join([*lines, killed]))


def test_plot_writes_a_png_with_and_without_eval(tmp_path, capsys):
    for with_eval in (False, True):
        _write_run(tmp_path, with_eval)
        train, evals = read_metrics(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in train] == [1, 10, 20, 30] and len(evals) == int(with_eval)
        assert _length_changes(train) == [(10, 128)]  # marked on the plot
        png = tmp_path / "metrics.png"
        png.unlink(missing_ok=True)
        assert main(["--workdir", str(tmp_path)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert str(png) in capsys.readouterr().out


def test_plot_of_a_directory_without_metrics_is_one_clear_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
