"""results.json is written atomically: readers never see a partial file, concurrent writers
never lose a record."""
import json
import multiprocessing as mp

from peft_vit.record import write_json_atomic


def _writer(args):
    path, i = args
    for j in range(50):
        write_json_atomic(path, {"writer": i, "j": j, "payload": "x" * 20000})
    return i


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "results.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["results.json"]


def test_concurrent_writers_same_file_always_complete(tmp_path):
    p = tmp_path / "results.json"
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_writer, [(p, 0), (p, 1)])
    rec = json.loads(p.read_text())  # a whole record from one writer, never a mix
    assert rec["j"] == 49 and len(rec["payload"]) == 20000
    assert [x.name for x in tmp_path.iterdir()] == ["results.json"]


def test_concurrent_writers_different_runs_lose_nothing(tmp_path):
    paths = [tmp_path / f"run{i}" / "results.json" for i in range(2)]
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_writer, [(paths[0], 0), (paths[1], 1)])
    assert [json.loads(p.read_text())["writer"] for p in paths] == [0, 1]


def test_wandb_offline_logger_records_counts_in_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb for other tests
    from omegaconf import OmegaConf

    from peft_vit.engine.logger import RunLogger

    lcfg = OmegaConf.load("configs/logger/wandb.yaml")
    assert lcfg.mode == "offline"
    log = RunLogger(lcfg, {"method": {"name": "lora"}}, tmp_path, name="lora/cifar/s0", group="sweep-x",
                    tags=["lora", "cifar", "final"])
    counts = {"trainable_params": 332_512, "trainable_params_no_head": 294_912, "total_params": 86_170_000}
    log.summary(counts)
    log.log({"train/loss": 1.0}, step=1)
    run = log.run
    assert run is not None and run.offline
    assert {k: run.summary[k] for k in counts} == counts
    assert run.group == "sweep-x" and set(run.tags) == {"lora", "cifar", "final"}
    log.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # `wandb sync` target


# ------------------------------------------------------------------ RunRecord: the schema

def _record(**kw):
    from peft_vit.record import RunRecord

    base = dict(method="householder", dataset="vtab", task="cifar", protocol="final", seed=0, test_acc=61.5,
                history=[{"epoch": 1, "acc": 61.5}], trainable_params=1234, config={"optim": {"lr": 1e-3}},
                diagnostics={"per_matrix": [{"layer": 0, "matrix": "q", "effective_rank": 3}]})
    return RunRecord(**{**base, **kw})


def test_run_record_round_trips_through_its_file(tmp_path):
    from peft_vit.record import RESULTS, RunRecord

    rec = _record(extra={"written_by": "another tool"})
    rec.write(tmp_path / RESULTS)
    on_disk = json.loads((tmp_path / RESULTS).read_text())
    assert list(on_disk)[:6] == ["method", "dataset", "task", "protocol", "seed", "test_acc"]
    assert on_disk["householder"] == rec.diagnostics and on_disk["written_by"] == "another tool"
    assert "val_acc" not in on_disk and "wall_time_s" not in on_disk  # unset: left out
    assert on_disk["experiment"] is None and on_disk["git_commit"] is None  # Optional: always written
    back = RunRecord.read(tmp_path / RESULTS)
    assert back == rec and back.accuracy == 61.5 and back.to_dict() == on_disk
    assert [x.name for x in tmp_path.iterdir()] == [RESULTS]  # atomic: no temp file left


def test_run_record_read_names_the_file_and_every_problem(tmp_path):
    import pytest

    from peft_vit.record import RecordError, RunRecord

    bad = _record().to_dict()
    del bad["task"]
    bad.update(seed="0", test_acc=float("nan"), compiled=1, history={"epoch": 1})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(RecordError) as e:
        RunRecord.read(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(e.value) and not e.value.unreadable
    assert e.value.problems == ["missing 'task'", "'seed' is str, expected int", "'test_acc' is nan, expected a finite "
                                "number", "'history' is dict, expected list", "'compiled' is int, expected bool"]
    tune = {**_record().to_dict(), "protocol": "tune"}  # a tune record must hold val_acc
    assert RunRecord.problems(tune) == ["missing 'val_acc' (the accuracy of a tune record)"]
    (tmp_path / "cut.json").write_text('{"method": ')
    with pytest.raises(RecordError, match=r"cut.json: unreadable run record") as e:
        RunRecord.read(tmp_path / "cut.json")
    assert e.value.unreadable
