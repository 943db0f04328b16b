"""The compiler wrapper of torchrec_hstu.aoti_toolchain, and the load failure it prevents.

The device's g++ links libstdc++ statically into AOTInductor libraries, and such a package failed
to load (SIGSEGV there). ``test_static_libstdcxx_package_loads_only_with_the_wrapper`` rebuilds
that toolchain here (g++ plus ``-static-libstdc++`` on link steps) and checks both sides: the
package linked by inductor's own command fails to load, the wrapped one loads and predicts.
"""

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from torchrec_hstu import aoti_toolchain
from torchrec_hstu.export import default_inductor_configs

from export_helpers import REPO


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_wrapper_adds_the_link_options_to_link_steps_only(tmp_path, monkeypatch):
    echo = _executable(tmp_path / "echo-compiler", '#!/bin/sh\necho "$@"\n')
    wrapper = aoti_toolchain.compiler_wrapper("exclude_libs", compiler=echo, directory=str(tmp_path))
    assert os.path.basename(wrapper).endswith("g++")  # inductor picks GCC flags by this name
    argv_log = tmp_path / "argv.txt"
    monkeypatch.setenv(aoti_toolchain.ENV_ARGV_LOG, str(argv_log))

    def run(*args):
        return subprocess.run([wrapper, *args], capture_output=True, text=True, check=True).stdout.split()

    assert run("-c", "a b.cpp", "-o", "b.o") == ["-c", "a", "b.cpp", "-o", "b.o"]
    assert run("-x", "c++-header", "h.h", "-o", "h.gch") == ["-x", "c++-header", "h.h", "-o", "h.gch"]
    assert run("x.o", "-shared", "-o", "x.so") == ["x.o", "-shared", "-o", "x.so", "-Wl,--exclude-libs,ALL"]
    assert len(argv_log.read_text().splitlines()) == 3
    # Written once per content: a second call returns the same file.
    assert aoti_toolchain.compiler_wrapper("exclude_libs", compiler=echo, directory=str(tmp_path)) == wrapper


def test_link_configs_modes(monkeypatch):
    monkeypatch.delenv(aoti_toolchain.ENV_LINK_MODE, raising=False)
    (wrapper,) = aoti_toolchain.link_configs()["cpp.cxx"]
    assert os.access(wrapper, os.X_OK)
    assert aoti_toolchain.link_configs("torch") == {}
    monkeypatch.setenv(aoti_toolchain.ENV_LINK_MODE, "torch")
    assert aoti_toolchain.link_configs() == {}
    assert "cpp.cxx" not in default_inductor_configs("cpu")
    assert default_inductor_configs("cuda") == {"triton.autotune_at_compile_time": False}
    monkeypatch.setenv(aoti_toolchain.ENV_LINK_MODE, "static")
    with pytest.raises(ValueError, match="TORCHREC_HSTU_AOTI_LINK.*'static'"):
        aoti_toolchain.link_configs()
    with pytest.raises(ValueError, match="mode must be one of"):
        aoti_toolchain.compiler_wrapper("torch")


def _static_libstdcxx_available():
    gxx = shutil.which("g++")
    if gxx is None:
        return False
    found = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(found) and os.path.exists(found)


_COMPILE_AND_SAVE = textwrap.dedent("""
    import sys, torch
    package, compiler = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    x = torch.randn(5, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    # No precompiled header: it would be built anew for each compiler, and it is not under test.
    configs = {"cpp.cxx": (compiler,), "aot_inductor.precompile_headers": False}
    torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs=configs)
    with torch.inference_mode():
        torch.save({"x": torch.randn(7, 8), "want": model(torch.randn(7, 8, generator=torch.Generator().manual_seed(1)))},
                   package + ".io.pt")
""")

_LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    package = sys.argv[1]
    saved = torch.load(package + ".io.pt")
    runner = torch._inductor.aoti_load_package(package)
    with torch.inference_mode():
        got = runner(torch.randn(7, 8, generator=torch.Generator().manual_seed(1)))
    print("max_abs_diff", (got - saved["want"]).abs().max().item())
""")


@pytest.mark.skipif(not _static_libstdcxx_available(), reason="needs g++ and a static libstdc++ (libstdc++.a)")
def test_static_libstdcxx_package_loads_only_with_the_wrapper(tmp_path):
    gxx = shutil.which("g++")
    # The device's toolchain: every link step pulls libstdc++ and libgcc in statically.
    static_gxx = _executable(tmp_path / "static-g++", textwrap.dedent(f"""\
        #!/bin/sh
        for arg do
          if [ "$arg" = "-shared" ]; then exec "{gxx}" "$@" -static-libstdc++ -static-libgcc; fi
        done
        exec "{gxx}" "$@"
    """))
    wrapped = aoti_toolchain.compiler_wrapper("exclude_libs", compiler=static_gxx, directory=str(tmp_path))
    runs = {}
    for name, compiler in (("inductor_command", static_gxx), ("wrapped", wrapped)):
        package = str(tmp_path / f"{name}.pt2")
        # Own processes and caches: a load may crash, and the two links must not share a library.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"cache-{name}"),
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        compile_process = subprocess.Popen([sys.executable, "-c", _COMPILE_AND_SAVE, package, compiler], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[name] = (package, env, compile_process)
    results = {}
    for name, (package, env, compile_process) in runs.items():
        output, _ = compile_process.communicate(timeout=600)
        assert compile_process.returncode == 0, output[-3000:]
        results[name] = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, package], env=env,
                                       capture_output=True, text=True, timeout=300)
    broken, fixed = results["inductor_command"], results["wrapped"]
    assert broken.returncode != 0, "a package with an exported static libstdc++ loaded: the hazard is gone here"
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "max_abs_diff 0.0" in fixed.stdout
