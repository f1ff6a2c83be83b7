"""experiments/million_steps.py at a tiny size, through its command line."""

import json

import pytest
import study


@pytest.mark.parametrize("remat", ["nested:3", "every_step"])
def test_streamed_gradient_matches_plain_bptt(tmp_path, remat, capsys):
    study.run("million_steps", ["--quick", "--remat", remat, "--check", "--out", tmp_path])
    saved = json.loads((tmp_path / "million_steps.json").read_text())
    assert saved["max_rel_diff_to_plain"] < 1e-5  # float32 model
    assert 0 < saved["remat_temp_bytes"] < saved["plain_temp_bytes"]
    assert saved["length"] == 37 and saved["seconds"] > 0
    assert "plain BPTT" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--length", "0"], ["--remat", "nested3x"], ["--cell", "x"]])
def test_rejects_bad_arguments(tmp_path, argv):
    with pytest.raises(SystemExit):
        study.run("million_steps", [*argv, "--out", tmp_path])
