"""The `vizoo` command line: list and info (other commands are tested with their subsystems)."""
import subprocess
import sys

from vizoo.cli import main


def test_list_evo_family(capsys):
    assert main(["list", "*evo*"]) == 0
    names = capsys.readouterr().out.split()
    for expected in ("resnet50v2_evob0", "resnet50v2_evos0", "mobilenetv2_100_evob0",
                     "mobilenetv2_100_evos0", "efficientnet_b0_evos0"):
        assert expected in names


def test_info_prints_params_macs_and_counter(capsys):
    assert main(["info", "mobilenetv2_100_evos0"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "MACs" in out and "flop_counter" in out


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "resnet50v2_evoss0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet50v2_evos0" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "vizoo", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("vizoo ")
