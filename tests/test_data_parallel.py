"""Data-parallel gradient averaging (trainer/nn/loop.DataParallel, what Ray Train's gloo workers run: docs/scaling.md)
in two real gloo processes: row-sparse embedding gradients, all-gathered, equal the dense all-reduce of the same
gradients; rows no rank touched stay without a gradient; a parameter no rank used keeps none."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, sparse: bool, out: str) -> None:
    import os

    from trainer.nn.loop import DataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        emb = torch.nn.Embedding(1000, 8, sparse=sparse)
        lin, unused = torch.nn.Linear(8, 1), torch.nn.Linear(2, 2)
        g = torch.Generator().manual_seed(rank)
        rows = torch.randint(0, 1000 if rank == 0 else 50, (64 if rank == 0 else 9,), generator=g)  # uneven shares
        loss = lin(emb(rows)).pow(2).mean()
        loss.backward()
        params = [emb.weight, lin.weight, lin.bias, unused.weight]
        mean = DataParallel(rank, world, 0).average_gradients(params, loss)
        assert unused.weight.grad is None
        assert emb.weight.grad.is_sparse == sparse
        if rank == 0:
            grad = emb.weight.grad.to_dense() if sparse else emb.weight.grad
            torch.save({"emb": grad, "lin": lin.weight.grad, "bias": lin.bias.grad, "loss": mean}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_sparse_gradients_average_like_dense_ones(tmp_path):
    got = {}
    for sparse in (False, True):
        out = tmp_path / f"{sparse}.pt"
        mp.spawn(_rank, args=(2, _free_port(), sparse, str(out)), nprocs=2)
        got[sparse] = torch.load(out)
    dense, sparse = got[False], got[True]
    torch.testing.assert_close(sparse["emb"], dense["emb"], rtol=0, atol=1e-7)
    assert torch.equal(sparse["lin"], dense["lin"]) and torch.equal(sparse["bias"], dense["bias"])
    assert sparse["loss"] == dense["loss"]
    touched = (dense["emb"] != 0).any(1)
    assert 50 < int(touched.sum()) < 1000  # some rows from both ranks, most rows untouched
