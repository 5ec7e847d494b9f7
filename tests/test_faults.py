"""Faults that must never cost a run or a checkpoint: non-finite updates, signals
(also on one of two ranks), changed settings on resume, over-long sentences."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    SMALL,
    TOY,
    needs_torchrun,
    tiny,
    torchrun,
    train_command,
    wait_for_rows,
)
from transformer.checkpoint import CheckpointError, load_checkpoint
from transformer.cli.train import train_main
from transformer.config import ConfigError, load_config
from transformer.training import Trainer, TrainingError


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def checkpoints_on_disk(run: Path) -> list[Path]:
    return sorted(run.glob("*.pt"))


def test_infinite_gradient_skips_the_update(tmp_path, toy_tokenizer, caplog):
    # no clipping configured: the gradient norm must be computed all the same
    cfg = tiny(tmp_path / "run", toy_tokenizer, "training.max_steps=6")
    assert cfg.training.clip_grad_norm == 0
    trainer = Trainer(cfg)
    weight = trainer.model.decoder[0].ffn.fc1.weight
    fired = []

    def infinite(grad):
        if trainer.state.step == 2 and not fired:  # in update 3
            fired.append(True)
            return torch.full_like(grad, float("inf"))
        return grad

    weight.register_hook(infinite)
    trainer.train()
    assert fired
    assert "non-finite gradient at step 3: update skipped" in caplog.text
    assert trainer.state.step == 6
    assert trainer.state.batch_in_epoch == 7  # the bad batch was consumed, not redone
    assert all_finite(trainer.model.state_dict())
    assert all_finite(load_checkpoint(tmp_path / "run" / "last.pt")["model"])


def test_non_finite_losses_stop_the_run_with_finite_checkpoints(
    tmp_path, toy_tokenizer, monkeypatch, caplog
):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=2")).train()
    good = load_checkpoint(run / "last.pt")["model"]
    trainer = Trainer(
        tiny(run, toy_tokenizer, "training.max_steps=10", "training.max_nonfinite=3")
    )
    monkeypatch.setattr(
        trainer,
        "_forward_loss",
        lambda batch, scale: (  # the loss, its input and its gradient
            torch.tensor(float("nan")),
            torch.zeros(1, requires_grad=True),
            torch.zeros(1),
        ),
    )
    with pytest.raises(TrainingError) as e:
        trainer.train()
    assert "3 non-finite updates in a row after step 2" in str(e.value)
    assert f"{run / 'last.pt'} (step 2)" in str(e.value)
    assert "non-finite loss at step 3: update skipped" in caplog.text
    after = load_checkpoint(run / "last.pt")
    assert after["step"] == 2
    for k, v in good.items():
        assert torch.equal(after["model"][k], v)


def test_non_finite_weights_are_never_written(tmp_path, toy_tokenizer, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(
        tiny(
            run,
            toy_tokenizer,
            "training.max_steps=10",
            "training.max_nonfinite=2",
            "training.save_every=2",
        )
    )
    real_step = trainer.optimizer.step

    def poisoning_step(*args, **kwargs):  # an update that itself breaks a weight
        out = real_step(*args, **kwargs)
        if trainer.state.step == 2:
            with torch.no_grad():
                trainer.model.decoder[0].ffn.fc1.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(trainer.optimizer, "step", poisoning_step)
    with pytest.raises(TrainingError) as e:
        trainer.train()
    assert f"{run / 'last.pt'} (step 2)" in str(e.value)  # as step_2.pt
    assert [p.name for p in checkpoints_on_disk(run)] == ["last.pt", "step_2.pt"]
    for path in checkpoints_on_disk(run):
        assert all_finite(load_checkpoint(path)["model"]), path


def test_second_ctrl_c_during_the_save_lets_it_finish(
    tmp_path, toy_tokenizer, monkeypatch
):
    from transformer.training import checkpointing

    run = tmp_path / "run"
    trainer = Trainer(tiny(run, toy_tokenizer, "training.max_steps=1000"))
    real_train_step, real_save = trainer.train_step, checkpointing.atomic_save

    def train_step(*args, **kwargs):
        result = real_train_step(*args, **kwargs)
        if trainer.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: stop after a step
        return result

    def save(state, path):
        os.kill(os.getpid(), signal.SIGINT)  # second Ctrl-C, in the middle of it
        time.sleep(0.05)
        real_save(state, path)

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(checkpointing, "atomic_save", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 4  # the update in flight was finished, then saved whole
    assert not list(run.glob(".*.tmp"))
    resumed = Trainer(tiny(run, toy_tokenizer, "training.max_steps=5"))
    assert resumed.state.step == 4


def test_resume_refuses_changed_batching_and_can_move_to_next_epoch(
    tmp_path, toy_tokenizer, caplog
):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=3")).train()
    with pytest.raises(CheckpointError, match=r"data\.max_tokens 256 -> 300"):
        Trainer(tiny(run, toy_tokenizer, "training.max_steps=5", "data.max_tokens=300"))
    with pytest.raises(CheckpointError, match=r"training\.accumulate 1 -> 2"):
        Trainer(
            tiny(run, toy_tokenizer, "training.max_steps=5", "training.accumulate=2")
        )
    moved = Trainer(
        tiny(
            run,
            toy_tokenizer,
            "training.max_steps=5",
            "data.max_tokens=300",
            "training.on_data_change=next_epoch",
        )
    )
    assert (moved.state.step, moved.state.epoch, moved.state.batch_in_epoch) == (
        3,
        1,
        0,
    )
    assert "restarts at the beginning of epoch 1" in caplog.text


def test_resume_refuses_a_changed_corpus(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=2")).train()
    with pytest.raises(CheckpointError, match="training corpus"):
        Trainer(tiny(run, toy_tokenizer, "data.toy_train_size=299"))


def cli_args(run, tokenizer, *extra) -> list[str]:
    """``transformer-train``'s arguments for the tiny toy run."""
    return [
        "--config",
        str(TOY),
        f"training.run_dir={run}",
        f"data.tokenizer.model={tokenizer}",
        f"data.cache_dir={Path(run).parent / 'cache'}",
        *SMALL,
        *extra,
    ]


def test_a_fresh_run_refuses_a_used_folder_unless_told_to_overwrite(
    tmp_path, toy_tokenizer, caplog, capsys
):
    """--no-resume into a folder holding another run would mix the two (its
    step_<N>.pt outrank the new ones in keep_last and averaging, its best.pt
    and metrics stay): refused, nothing touched; --overwrite deletes it first."""
    run = tmp_path / "run"
    steps = ("training.save_every=2", "training.keep_last=5")
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=6", *steps)).train()
    before = sorted(p.name for p in run.iterdir())
    assert {"step_6.pt", "best.pt", "last.pt", "metrics.jsonl"} <= set(before)
    with pytest.raises(
        TrainingError,
        match=r"holds a previous run's checkpoints \(best\.pt, .*Resume it",
    ):
        Trainer(tiny(run, toy_tokenizer, "training.max_steps=2"), resume=False)
    assert sorted(p.name for p in run.iterdir()) == before
    assert train_main(cli_args(run, toy_tokenizer, "--no-resume")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(ConfigError, match="training.overwrite: .*resume=never"):
        tiny(run, toy_tokenizer, "training.overwrite=true")  # would resume instead
    args = cli_args(run, toy_tokenizer, "training.max_steps=2", *steps)
    assert train_main([*args, "--overwrite"]) == 0
    assert "deleted the previous run" in caplog.text
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_2.pt"]
    assert load_checkpoint(run / "best.pt")["step"] == 2
    rows = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(row["step"] for row in rows) == 2
    saved = load_config(run / "config.yaml")  # an action, not a setting
    assert (saved.training.overwrite, saved.training.resume) == (False, "never")
    (run / "last.pt").unlink()  # checkpoints without last.pt: nothing to resume
    with pytest.raises(TrainingError) as refused:
        Trainer(tiny(run, toy_tokenizer, "training.max_steps=2"))
    assert "Resume it" not in str(refused.value)


def test_overwrite_keeps_what_others_still_use(tmp_path):
    from transformer.training.checkpointing import prepare_run_dir

    for drop in (True, False):
        run = tmp_path / str(drop)
        (run / "tensorboard").mkdir(parents=True)
        names = ("last.pt", "step_4.pt", "spm.model", "spm.json", "curves.png")
        for name in (*names, "notes.txt"):
            (run / name).write_text("x")
        (run / "cache").mkdir()
        prepare_run_dir(run, overwrite=True, drop_tokenizer=drop)
        left = sorted(p.name for p in run.iterdir())
        kept = ["cache", "notes.txt"]
        assert left == (kept if drop else [*kept, "spm.json", "spm.model"])
    # the checkpoint a fine-tuning run starts from: refused, nothing deleted
    run = tmp_path / "parent"
    run.mkdir()
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        (run / name).write_text("x")
    with pytest.raises(TrainingError, match=r"would delete .*best\.pt.*init_from"):
        prepare_run_dir(run, overwrite=True, protect=[run / "best.pt"])
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "last.pt",
        "metrics.jsonl",
    ]
    prepare_run_dir(tmp_path / "empty", overwrite=False)


def test_fine_tuning_from_the_folder_it_overwrites_is_refused(
    tmp_path, toy_tokenizer, capsys
):
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, "training.max_steps=2")).train()
    parent = run / "best.pt"
    args = cli_args(run, toy_tokenizer, f"training.init_from={parent}", "--overwrite")
    assert train_main(args) == 1
    assert "copy it out of the run folder first" in capsys.readouterr().err
    assert parent.exists() and (run / "last.pt").exists()


def test_earlier_attempts_without_checkpoints_are_kept_aside(tmp_path, caplog):
    from transformer.training.checkpointing import prepare_run_dir

    for attempt in (1, 2):
        (tmp_path / "metrics.jsonl").write_text(f'{{"attempt": {attempt}}}\n')
        (tmp_path / "tensorboard").mkdir()
        prepare_run_dir(tmp_path, overwrite=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    for attempt in (1, 2):
        aside = tmp_path / f"metrics.{attempt}.jsonl"
        assert aside.read_text() == f'{{"attempt": {attempt}}}\n'
        assert (tmp_path / f"tensorboard.{attempt}").is_dir()
    assert "metrics.2.jsonl" in caplog.text


def test_the_run_folder_tokenizer_is_reused_only_under_its_settings(
    tmp_path, toy_tokenizer
):
    from transformer.data import DataError
    from transformer.training.distributed import Distributed
    from transformer.training.tokenizer_choice import (
        choose_tokenizer,
        saved_tokenizer_is_current,
    )

    def build_tokenizer(cfg, run, ranks):
        return choose_tokenizer(cfg, run, ranks).tokenizer

    run = tmp_path / "run"
    cfg = tiny(run, toy_tokenizer)
    cfg.data.tokenizer.model = None
    cfg.data.tokenizer.vocab_size = 30
    assert not saved_tokenizer_is_current(cfg, run)
    first = choose_tokenizer(cfg, run, Distributed())
    assert first.origin == "trained"
    assert saved_tokenizer_is_current(cfg, run)
    stamp = (run / "spm.model").stat().st_mtime_ns
    again = choose_tokenizer(cfg, run, Distributed())
    assert again.origin == "run folder"
    assert again.tokenizer.hash() == first.tokenizer.hash()
    assert (run / "spm.model").stat().st_mtime_ns == stamp  # reused, not retrained
    for key, value, says in (
        (
            "data.tokenizer.vocab_size",
            35,
            "data.tokenizer.vocab_size: trained with 30, the config says 35",
        ),
        (
            "training.seed",
            7,
            f"training.seed: trained with {cfg.training.seed}, the config says 7",
        ),
        ("data.toy_train_size", 299, "the training corpora (data): other content"),
    ):
        changed = tiny(run, toy_tokenizer, f"{key}={value}")
        changed.data.tokenizer.model = None
        changed.data.tokenizer.vocab_size = value if "vocab" in key else 30
        assert not saved_tokenizer_is_current(changed, run)
        with pytest.raises(DataError, match="trained with other settings") as e:
            build_tokenizer(changed, run, Distributed())
        assert says in str(e.value), str(e.value)
    for damaged in ("[1]", "{not json", "null"):
        (run / "spm.json").write_text(damaged)
        assert not saved_tokenizer_is_current(cfg, run)
        with pytest.raises(DataError, match=r"spm\.json: "):
            build_tokenizer(cfg, run, Distributed())


def test_overwrite_on_the_command_line_excludes_resume(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--config", "x.yaml", "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


LINES = "".join(f"{'a b c d e f g h'[: 2 + 2 * (i % 7)]}\n" for i in range(200))


def text_corpus(folder: Path) -> list[str]:
    """A small plain-text corpus (train and val) in ``folder``; its overrides."""
    folder.mkdir()
    for name in ("train.src", "train.tgt", "val.src", "val.tgt"):
        (folder / name).write_text(LINES)
    return [
        "data.format=text",
        "data.src_lang=src",
        "data.tgt_lang=tgt",
        "data.max_tokens=64",
        f"data.dir={folder}",  # last: a test may point it elsewhere
    ]


def test_resume_follows_the_corpus_content_not_its_path_or_time(
    tmp_path, toy_tokenizer
):
    """A fresh checkout or a copy of the same corpus (new times, new folder) is
    the same corpus: the run resumes at its data position; new content is not."""
    first = tmp_path / "first"
    files = text_corpus(first)
    run = tmp_path / "run"
    Trainer(tiny(run, toy_tokenizer, *files, "training.max_steps=2")).train()
    saved = load_checkpoint(run / "last.pt")
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    for path in copy.iterdir():
        os.utime(path, ns=(10**18, 10**18))
    files = [*files[:-1], f"data.dir={copy}"]
    resumed = Trainer(tiny(run, toy_tokenizer, *files, "training.max_steps=4"))
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (
        saved["epoch"],
        saved["batch_in_epoch"],
    )
    (copy / "train.tgt").write_text(LINES.replace("a b", "b a", 1))
    with pytest.raises(CheckpointError, match="training corpus"):
        Trainer(tiny(run, toy_tokenizer, *files, "training.max_steps=4"))


def test_a_checkpoint_from_before_content_keys_resumes_while_its_files_stay(
    tmp_path, toy_tokenizer
):
    from transformer.checkpoint import atomic_save
    from transformer.data.store import legacy_store_key
    from transformer.tokenizer import Tokenizer

    data = tmp_path / "data"
    files = text_corpus(data)
    run = tmp_path / "run"
    cfg = tiny(run, toy_tokenizer, *files, "training.max_steps=2")
    Trainer(cfg).train()
    ckpt = load_checkpoint(run / "last.pt")
    tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    old = legacy_store_key(cfg.data, "train", tokenizer, cfg.training.seed)
    ckpt["data_signature"]["training corpus"] = f"{old}x1"  # as written then
    atomic_save(ckpt, run / "last.pt")
    resumed = Trainer(tiny(run, toy_tokenizer, *files, "training.max_steps=4"))
    assert resumed.state.batch_in_epoch == ckpt["batch_in_epoch"]
    os.utime(data / "train.src", ns=(10**18, 10**18))  # then, no telling: refused
    with pytest.raises(CheckpointError, match="training corpus"):
        Trainer(tiny(run, toy_tokenizer, *files, "training.max_steps=4"))


def test_over_long_validation_sentences_are_truncated(tmp_path, toy_tokenizer, caplog):
    data = tmp_path / "data"
    data.mkdir()
    short = "a b c d\ne f g\n" * 20
    (data / "train.src").write_text(short)
    (data / "train.tgt").write_text(short)
    long = " ".join("abcdefghij"[i % 10] for i in range(150))  # > 64 positions
    (data / "val.src").write_text(f"a b c\n{long}\n")
    (data / "val.tgt").write_text(f"a b c\n{long}\n")
    cfg = tiny(
        tmp_path / "run",
        toy_tokenizer,
        "data.format=text",
        f"data.dir={data}",
        "data.src_lang=src",
        "data.tgt_lang=tgt",
        "training.max_steps=2",
        "training.validate_every=2",
        "training.valid_bleu=true",
        "training.best_metric=bleu",
    )
    assert cfg.model.max_positions == 64
    Trainer(cfg).train()
    assert "1 sentence pair(s) longer than the model's 63 pieces" in caplog.text
    assert (
        "bleu"
        in load_checkpoint(tmp_path / "run" / "best.pt")["config"]["training"][
            "best_metric"
        ]
    )


# --- two ranks (gloo) ---


def assert_same_weights(a: dict, b: dict) -> None:
    for name, weight in a.items():
        assert torch.equal(weight, b[name]), name


@pytest.mark.slow
@needs_torchrun
def test_infinite_gradient_on_one_rank_skips_on_both(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    ranks = torchrun(
        tmp_path,
        tmp_path / "out",
        run,
        f"data.tokenizer.model={toy_tokenizer}",
        "training.max_steps=5",
        env={"FAULT_INF_GRAD": "1:3"},
    )
    assert ranks[0]["step"] == ranks[1]["step"] == 5
    assert_same_weights(ranks[0]["model"], ranks[1]["model"])
    assert all_finite(ranks[0]["model"])
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 5 and all_finite(last["model"])
    assert last["batch_in_epoch"] == 6  # one update was skipped on both ranks


@pytest.mark.slow
@needs_torchrun
def test_sigterm_on_one_rank_stops_both_and_resumes_bit_identically(
    tmp_path, toy_tokenizer
):
    run = tmp_path / "run"
    out = tmp_path / "out"
    tok = f"data.tokenizer.model={toy_tokenizer}"
    proc = torchrun(tmp_path, out, run, tok, "training.max_steps=100000", wait=False)
    metrics = run / "metrics.jsonl"
    wait_for_rows(metrics, 3)
    os.kill(int((out / "pid1").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-4000:]
    stopped = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    step = stopped[0]["step"]
    assert step >= 3 and stopped[1]["step"] == step
    assert load_checkpoint(run / "last.pt")["step"] == step

    resumed = torchrun(
        tmp_path, tmp_path / "out2", run, tok, f"training.max_steps={step + 3}"
    )
    straight = torchrun(
        tmp_path,
        tmp_path / "out3",
        tmp_path / "straight",
        tok,
        f"training.max_steps={step + 3}",
    )
    assert resumed[0]["step"] == straight[0]["step"] == step + 3
    assert_same_weights(resumed[0]["model"], straight[0]["model"])
    assert_same_weights(resumed[1]["model"], straight[1]["model"])


def _rank0_fails_or_stalls(rank: int, init_file: str, mode: str, errors) -> None:
    import torch.distributed as dist

    from transformer.data import DataError
    from transformer.training.distributed import Distributed

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    ranks = Distributed(rank=rank, world=2)
    ranks.init(torch.device("cpu"), timeout=60, prepare_timeout=2)

    def work():
        if mode == "fail":
            raise DataError("corpus.de: the training corpus is empty")
        time.sleep(6)  # longer than prepare_timeout
        return 1

    try:
        ranks.main_first(work, "training the SentencePiece model")
    except Exception as e:
        errors.put((rank, type(e).__name__, str(e)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fail", "stall"])
def test_other_ranks_get_a_clear_error_when_rank0_fails_or_stalls(tmp_path, mode):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank0_fails_or_stalls,
            args=(r, str(tmp_path / "init"), mode, errors),
        )
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    found = {}
    while not errors.empty():
        rank, kind, message = errors.get()
        found[rank] = (kind, message)
    kind, message = found[1]
    assert kind == "TrainingError"
    if mode == "fail":
        assert message == (
            "rank 0 failed while training the SentencePiece model: "
            "DataError: corpus.de: the training corpus is empty"
        )
        assert found[0][0] == "DataError"
    else:
        assert "no word from rank 0 while training the SentencePiece model" in message
        assert "training.prepare_timeout=2 s" in message


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "each"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_to_the_process_group_with_data_workers(
    tmp_path, toy_tokenizer, sig, target
):
    # a terminal's Ctrl-C or a scheduler's SIGTERM to the job's process group, or
    # one to every process of the job (pkill -f, systemd's control group, Slurm's
    # job step), reaches the DataLoader workers too: only the main process reacts,
    # finishes the step, saves and exits cleanly
    run = tmp_path / "run"
    args = train_command(
        run, toy_tokenizer, "data.workers=2", "training.max_steps=100000"
    )
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    metrics = run / "metrics.jsonl"
    wait_for_rows(metrics, 3)
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        workers = children(proc.pid)
        assert len(workers) >= 2, workers
        for pid in workers:  # the workers first, mid-step: the harder order
            os.kill(pid, sig)
        time.sleep(1)
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert err.decode().count(f"{sig.name}: stopping after this step") == 1
    assert "killed by signal" not in err.decode()
    assert load_checkpoint(run / "last.pt")["step"] >= 3
