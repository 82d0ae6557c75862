"""tests/conftest.py's report of a native crash: a test worker killed by a segfault leaves its
stack dump in the crash folder, and the session summary prints the signal and the crashing
thread's stack at the end of the output (a crash on a thread Python does not run: every
thread's stack)."""

import os
import pathlib
import subprocess
import sys
import textwrap

from conftest import crash_reports

TESTS = pathlib.Path(__file__).resolve().parent


def test_a_segfault_leaves_the_crashing_threads_stack(tmp_path):
    script = tmp_path / "crash.py"  # a file: the dump names it (frames of "<string>" are cut)
    script.write_text(
        textwrap.dedent(
            f"""
            import faulthandler, threading, time
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            faulthandler.enable(open({str(tmp_path / "gw1-1.log")!r}, "w"), all_threads=True)
            def compile_the_program():
                faulthandler._sigsegv()
            compile_the_program()
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True)
    assert result.returncode != 0
    (tmp_path / "gw0-2.log").write_text("")  # a worker that did not crash: no report
    (report,) = crash_reports(str(tmp_path))
    lines = report.splitlines()
    assert lines[0] == "gw1-1.log"
    assert "Segmentation fault" in lines[1]
    assert lines[2].startswith("Current thread")
    assert any("compile_the_program" in line for line in lines[3:])
    assert not any("sleep" in line for line in lines)  # the other thread is left out


def test_a_crash_outside_python_threads_keeps_every_threads_stack(tmp_path):
    # faulthandler's dump when a thread Python does not run (one of XLA's) crashes: no
    # "Current thread" block, only the Python threads
    (tmp_path / "gw0-7.log").write_text(
        "Fatal Python error: Aborted\n\n"
        "Thread 0x00007f0000000001 (most recent call first):\n"
        '  File "/site-packages/jax/_src/compiler.py", line 335 in backend_compile\n'
        '  File "/site-packages/_pytest/runner.py", line 1 in runtest\n\n'
        "Thread 0x00007f0000000002 (most recent call first):\n"
        '  File "/work/tests/test_x.py", line 9 in test_waiting\n\n'
        "Extension modules: jaxlib.cpu_feature_guard (total: 1)\n"
    )
    (report,) = crash_reports(str(tmp_path))
    lines = report.splitlines()
    assert lines[:3] == [
        "gw0-7.log",
        "Fatal Python error: Aborted",
        "Thread 0x00007f0000000001 (most recent call first):",
    ]
    assert "backend_compile" in lines[3] and "test_waiting" in lines[5]
    assert not any("_pytest" in line or "Extension" in line for line in lines)


def test_the_session_summary_of_an_xdist_run_prints_the_stack(tmp_path):
    """A real pytest session with an xdist worker and this conftest as a plugin: one test
    segfaults (the worker is replaced for the next); the end of the output names the signal
    and the test's frame."""
    (tmp_path / "test_native.py").write_text(
        "import faulthandler\n\n\ndef test_fine():\n    pass\n\n\n"
        "def test_native_crash_inside():\n    faulthandler._sigsegv()\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env |= {  # a session of its own (this one may be a worker), writing to its own folder
        "PYTHONPATH": str(TESTS),
        "RLJAX_TEST_CRASH_DIR": str(crashes),
    }
    argv = [sys.executable, "-m", "pytest", "-n", "1", "-p", "conftest", "-p", "no:cacheprovider"]
    argv += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "-q"]
    result = subprocess.run(
        [*argv, str(tmp_path / "test_native.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    tail = result.stdout[result.stdout.index("native crash (stack of the crashing thread)") :]
    assert "Segmentation fault" in tail
    assert "in test_native_crash_inside" in tail
    assert "1 failed, 1 passed" in tail
