"""Sharded checkpoints and the run folder under failure: a save killed at every point
of its rename sequence is recovered to the newest complete checkpoint (or refused
with the true reason), every shard is checked against its SHA-256, the manifest's
version is checked, and a stale lock is taken over by one run only.

A one-process gloo group stands in for the mesh: the rename sequence and the
manifest are rank 0's work on any number of processes."""

import pathlib
import shutil
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from llmcore.parallel import dcp
from llmcore.parallel.native import apply_fsdp
from llmcore.train import TrainConfig, outdir, train
from llmcore.train.outdir import SHARDS, claim_out
from tests.test_train import NaNAt, batch_fn, make_model


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def loaded_weight(path) -> torch.Tensor:
    model, opt = model_and_optimizer(99)
    dcp.load(path, model, opt)
    return model.weight.detach().clone()


class Crash(BaseException):
    """What SIGKILL does to a save: it stops at that point, cleaning nothing."""


def crash_at(monkeypatch, point: str) -> None:
    """Make the next dcp.save stop at ``point`` of its sequence."""
    if point == "shards":  # the ranks' files written, the manifest not yet
        real_save = torch.save

        def save(obj, f, *a, **k):
            if str(f).endswith(dcp.EXTRA):
                raise Crash
            return real_save(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", save)
    elif point in ("rename 1", "rename 2"):  # before the first or second rename
        renames = {"n": 0}
        real = pathlib.Path.rename

        def rename(self, target):
            if self.name.startswith(SHARDS):  # not the files inside
                renames["n"] += 1
                if renames["n"] == int(point[-1]):
                    raise Crash
            return real(self, target)
        monkeypatch.setattr(pathlib.Path, "rename", rename)
    elif point == "cleanup":  # both renames done, the old directory still there
        def rmtree(*a, **k):
            raise Crash
        monkeypatch.setattr(dcp.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("point, kept", [("shards", 1), ("rename 1", 2),
                                         ("rename 2", 2), ("cleanup", 2)])
def test_a_save_killed_anywhere_recovers_the_newest_complete_checkpoint(
        tmp_path, group, monkeypatch, point, kept):
    out = tmp_path / "run"
    out.mkdir()
    path = out / SHARDS
    first, second = model_and_optimizer(1), model_and_optimizer(2)
    dcp.save(path, *first, 1, extra={"step": 1})
    with monkeypatch.context() as m:
        crash_at(m, point)
        with pytest.raises(Crash):
            dcp.save(path, *second, 2, extra={"step": 2})
    # what the next `--resume` does first, on rank 0, under the lock
    with claim_out(out, resume=True, overwrite=False):
        pass
    assert sorted(p.name for p in out.iterdir()) == [SHARDS]
    assert dcp.read_extra(path) == {"step": kept}
    want = (first if kept == 1 else second)[0].weight
    assert torch.equal(loaded_weight(path), want.detach())


def test_a_first_save_killed_before_it_completed_is_refused_saying_so(tmp_path,
                                                                       group,
                                                                       monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    with monkeypatch.context() as m:
        crash_at(m, "shards")
        with pytest.raises(Crash):
            dcp.save(out / SHARDS, *model_and_optimizer(1), 3)
    refused = r"no checkpoint .*ckpt\.dcp to continue; removed ckpt\.dcp\.tmp-3, left"
    with pytest.raises(FileNotFoundError, match=refused), \
            claim_out(out, resume=True, overwrite=False):
        pass
    assert list(out.iterdir()) == []


def test_a_flipped_byte_in_a_shard_is_an_error_naming_the_file(tmp_path, group):
    path = tmp_path / SHARDS
    model, opt = model_and_optimizer(1)
    dcp.save(path, model, opt, 1)
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(dcp.ShardError, match=rf"{shard} is corrupted"):
        loaded_weight(path)
    shard.unlink()
    with pytest.raises(dcp.ShardError, match=rf"{shard} is missing"):
        loaded_weight(path)


def test_the_manifest_version_is_checked(tmp_path, group):
    path = tmp_path / SHARDS
    dcp.save(path, *model_and_optimizer(1), 1)
    manifest = torch.load(path / dcp.EXTRA, weights_only=True)
    torch.save({**manifest, "version": dcp.VERSION + 1}, path / dcp.EXTRA)
    with pytest.raises(dcp.ShardError, match=f"version {dcp.VERSION + 1}; this "
                                             f"llmcore reads version {dcp.VERSION}"):
        dcp.read_extra(path)
    shutil.rmtree(path)
    path.mkdir()
    (path / ".metadata").write_bytes(b"")
    with pytest.raises(dcp.ShardError, match="extra.pt, written last by a save, is "
                                             "missing"):
        dcp.read_extra(path)


def test_the_optimizer_keeps_its_own_kernel_choice_when_it_loads(tmp_path, group):
    # a run saved with the fused kernel (FSDP) resumed where only the one-tensor
    # update works (a tensor-parallel model mixing DTensors and tensors)
    model, _ = model_and_optimizer(1)
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(2, 8)).sum().backward()
    fused.step()
    dcp.save(tmp_path / SHARDS, model, fused, 1)
    model.zero_grad(set_to_none=True)  # as in a fresh run, which loads
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    dcp.load(tmp_path / SHARDS, model, plain)
    assert plain.param_groups[0]["fused"] is None
    assert plain.param_groups[0]["foreach"] is False
    assert plain.state[model.weight]["exp_avg"].abs().sum() > 0  # the state came


def test_a_stale_lock_is_taken_over_by_one_run_only(tmp_path, monkeypatch):
    """Two runs find the same stale lock. The first to decide it is stale is held
    up for a moment, as a busy machine would; the second takes the lock meanwhile.
    Before, the first then deleted the second's fresh lock and wrote its own: two
    runs in one folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / outdir.LOCK).write_text("999999999 " + outdir.socket.gethostname())
    real_read = outdir._read_lock
    first = threading.Event()

    def slow_read(lock):
        found = real_read(lock)
        if threading.current_thread().name == "early" and not first.is_set():
            first.set()
            time.sleep(0.5)  # the other run takes the lock now
        return found
    monkeypatch.setattr(outdir, "_read_lock", slow_read)
    results = {}

    def take(name):
        try:
            with claim_out(out, resume=False, overwrite=False):
                time.sleep(1.0)  # both would be writing now
                results[name] = "ran"
        except RuntimeError as err:
            results[name] = str(err)
    early = threading.Thread(target=take, args=("early",), name="early")
    early.start()
    first.wait(5)
    late = threading.Thread(target=take, args=("late",), name="late")
    late.start()
    early.join()
    late.join()
    assert sorted(results.values()).count("ran") == 1, results
    assert any("is writing to" in r for r in results.values()), results
    assert not (out / outdir.LOCK).exists()


def test_a_damaged_former_checkpoint_with_nothing_better_is_kept(tmp_path, group):
    path = tmp_path / SHARDS
    dcp.save(path, *model_and_optimizer(1), 1)
    old = path.rename(tmp_path / f"{SHARDS}.old")  # a save killed after its 1st rename
    shard = next(old.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (notes,) = dcp.recover(path)
    assert "ckpt.dcp.old is damaged" in notes and old.is_dir() and not path.exists()


def test_a_sharded_run_that_diverges_is_put_back_to_its_last_checkpoint(tmp_path,
                                                                          group):
    """The loop's rollback after a non-finite step, for a model in shards (as
    ``--dp 1 --tp 1`` trains): it called the sharded restore with arguments that
    only the whole-file one took."""
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    model = apply_fsdp(make_model(), mesh)
    path = tmp_path / SHARDS
    with pytest.raises(FloatingPointError, match="at step 6.*checkpoint, step 4"):
        train(model, batch_fn, TrainConfig(max_steps=10, ckpt_interval=4,
                                           log_interval=4, progress=False),
              loss_fn=NaNAt(6), ckpt_path=path)
    assert dcp.read_extra(path)["step"] == 4
    saved = make_model()
    dcp.load(path, apply_fsdp(saved, mesh))
    for (name, p), q in zip(model.named_parameters(), saved.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name
