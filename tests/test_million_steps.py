"""Smoke test of experiments/million_steps.py at a tiny size."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import million_steps  # noqa: E402


@pytest.mark.parametrize("remat", ["nested3", "everystep"])
def test_streamed_gradient_matches_plain_bptt(tmp_path, remat, capsys):
    argv = ["--length", "37", "--batch", "2", "--input", "3", "--hidden", "4"]
    result = million_steps.main([*argv, "--remat", remat, "--check", "--out", str(tmp_path)])
    assert result["max_rel_diff_to_plain"] < 1e-5  # float32 model
    assert 0 < result["remat_temp_bytes"] < result["plain_temp_bytes"]
    saved = json.loads((tmp_path / "million_steps.json").read_text())
    assert saved["length"] == 37 and saved["seconds"] > 0
    assert "plain BPTT" in capsys.readouterr().out


def test_rejects_bad_length(tmp_path):
    with pytest.raises(SystemExit):
        million_steps.main(["--length", "0", "--out", str(tmp_path)])
