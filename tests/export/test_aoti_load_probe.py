"""The AOTI load probe (benchmarks/aoti_load_probe.py) on CPU: compile, same-process load, and a
fresh-process load that runs the package and compares with the saved eager output."""

import importlib.util
import json
import os

from export_helpers import REPO


def _probe_module():
    spec = importlib.util.spec_from_file_location("aoti_load_probe", os.path.join(REPO, "benchmarks", "aoti_load_probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_reaches_every_stage_on_cpu(tmp_path):
    probe = _probe_module()
    assert probe.main(["--device", "cpu", "--cases", "linear", "--out-dir", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "aoti-load-probe.json").read_text())["results"]
    assert result["compile"]["last_stage"] == "loaded_same_process"
    assert result["fresh_load"]["last_stage"] == "ran"
    assert result["fresh_load"]["detail"] == "max|package - eager| 0.00e+00"
    assert "STAGE ran" in (tmp_path / "aoti-probe-linear-fresh_load.log").read_text()


def test_probe_reports_the_stage_a_crash_stopped_at():
    probe = _probe_module()
    output = "noise\nSTAGE started torch x\nSTAGE exported\nFatal Python error: Segmentation fault\n"
    assert probe._last_stage(output) == ("exported", "")
    assert probe._last_stage("no stages") == ("none", "")
