from tumorseg.runs import runfolder


def test_the_resume_command_of_a_torchrun_run_names_torchrun(tmp_path, monkeypatch):
    """Under torchrun (4 processes) the advice is the torchrun command, not a single-process one."""
    run = tmp_path / "r"
    run.mkdir()
    monkeypatch.setattr(runfolder, "run_progress", lambda folder: (2, 6))
    monkeypatch.setattr(runfolder, "is_unfinished_run", lambda folder: True)
    monkeypatch.setattr(runfolder, "rank_and_world", lambda: (0, 4))
    advice = runfolder.run_folder_refusal(run, FileExistsError(str(run)))
    assert f"torchrun --nproc_per_node=4 train.py --resume {run}\n" in advice
    monkeypatch.setattr(runfolder, "rank_and_world", lambda: (0, 1))
    assert f"    python train.py --resume {run}\n" in runfolder.run_folder_refusal(run, FileExistsError(str(run)))
