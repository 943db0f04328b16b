"""The AOTI load probe (benchmarks/aoti_load_probe.py) on CPU: compile, same-process load, and a
fresh-process load that runs the package and compares with the saved eager output; and the load
steps (benchmarks/aoti_load_steps.py) of a package linked through the compiler wrapper."""

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


def test_load_steps_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("aoti_load_steps", os.path.join(REPO, "benchmarks", "aoti_load_steps.py"))
    steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(steps)
    assert steps.main(["--device", "cpu", "--variants", "exclude_libs", "--steps", "metadata", "runner",
                       "--out-dir", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "aoti-load-steps.json").read_text())
    assert "'AOTI_DEVICE_KEY': 'cpu'" in result["metadata"]["last"]
    assert result["runner"]["last"].endswith("ran: max|package - eager| 0.00e+00")
    # The package was linked through the wrapper: its link step is in the command-line log.
    assert "-Wl,--exclude-libs,ALL" in (tmp_path / "exclude_libs-cxx-argv.txt").read_text()
