"""tumorseg/runs/runfolder.py: one process per run folder, freed when its holder ends however it ends."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tumorseg.runs import runfolder


def test_a_run_folder_lock_is_exclusive_until_released(tmp_path):
    held = runfolder.lock_run_folder(tmp_path)
    with pytest.raises(runfolder.RunFolderBusy, match=f"in use by process {os.getpid()} on "):
        runfolder.lock_run_folder(tmp_path)
    held.close()
    runfolder.lock_run_folder(tmp_path).close()


def test_a_killed_holder_frees_its_run_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tumorseg.runs import runfolder; "
                               "held = runfolder.lock_run_folder(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runfolder.RunFolderBusy, match=f"process {holder.pid} "):
            runfolder.lock_run_folder(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the operating system drops the lock
        holder.wait()
    runfolder.lock_run_folder(tmp_path).close()
