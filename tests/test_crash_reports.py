"""tests/conftest.py's report of a native crash: a process killed by a segfault leaves its
stack dump in the crash folder, and the report keeps the signal and the crashing thread's
stack (the session summary prints it at the end of the output)."""

import subprocess
import sys
import textwrap

from conftest import crash_reports


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
