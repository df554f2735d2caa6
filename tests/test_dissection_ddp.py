"""Network dissection under DDP (spec dissection.md §8: tallies and top-m buffers are mergeable across ranks).

Two CPU processes (gloo, ``file://`` rendezvous, no sockets beyond loopback) each feed every 2nd batch of the
same data into :class:`UnitQuantiles` and :class:`IoUTally`; the synced results must equal a single-process run
over all batches exactly (thresholds and integer tallies).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from featurelens.analysis.dissection import IoUTally, UnitQuantiles
from featurelens.data.broden import BrodenDataset
from featurelens.data.synthbroden import write_synthbroden

N_IMAGES, SIZE, BATCH, UNITS, Q, WORLD = 24, 32, 4, 6, 0.05, 2
TALLY_KEYS = ("intersection", "label_count", "act_paper", "act_lite", "act_total", "pixels", "images")


def _model() -> torch.nn.Module:
    """A tiny random conv net (same weights in every process): 32 px -> 8x8 maps of UNITS channels."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, UNITS, 3, stride=2, padding=1)).eval()


def _batches(ds: BrodenDataset):
    """Fixed batches of (images, [labels per image]) in dataset order."""
    for b0 in range(0, len(ds), BATCH):
        items = [ds[i] for i in range(b0, min(b0 + BATCH, len(ds)))]
        yield torch.stack([x for x, _ in items]), [lab for _, lab in items]


def _dissect(root: str, rank: int = 0, world: int = 1) -> dict:
    """Both passes over this rank's shard (batches rank, rank + world, ...); Metrics sync in ``compute``."""
    ds = BrodenDataset(root)
    model = _model()
    batches = [b for i, b in enumerate(_batches(ds)) if i % world == rank]
    with torch.no_grad():
        acts = [(model(x), labels) for x, labels in batches]
    H, W = acts[0][0].shape[-2:]
    quant = UnitQuantiles(UNITS, len(ds) * H * W, Q)
    for a, _ in acts:
        quant.update(a)
    T = quant.compute()
    tally = IoUTally(UNITS, ds.num_labels, ds.primary_category, num_categories=len(ds.categories))
    for a, labels in acts:
        tally.update(a, labels, T)
    out = {k: v.clone() for k, v in tally.compute().items()}
    out["thresholds"] = T.clone()
    out["local_images"] = sum(len(labels) for _, labels in acts)
    return out


def _worker(rank: int, world: int, store: str, root: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = _dissect(root, rank, world)
        gathered = [None] * world
        dist.all_gather_object(gathered, out)  # every rank must hold the same global result
        if rank == 0:
            torch.save(gathered, result)
    finally:
        dist.destroy_process_group()


def test_dissection_metrics_sync_across_ranks(tmp_path):
    root = str(write_synthbroden(tmp_path / "synthbroden", n_images=N_IMAGES, size=SIZE, seed=0))
    result = tmp_path / "ddp.pt"
    tmp_mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), root, str(result)), nprocs=WORLD, join=True)
    ranks = torch.load(result, weights_only=False)
    single = _dissect(root)

    assert [r["local_images"] for r in ranks] == [12, 12]  # each rank really saw only its shard
    assert single["local_images"] == N_IMAGES
    for r in ranks:
        assert r["thresholds"].dtype == torch.float64
        assert torch.equal(r["thresholds"], single["thresholds"])
        for k in TALLY_KEYS:
            assert r[k].dtype == torch.int64, k
            assert torch.equal(r[k], single[k]), k
    # the tallies are not trivial: units fire and overlap labels, every image and pixel is counted
    assert int(single["images"]) == N_IMAGES and int(single["pixels"]) == N_IMAGES * (SIZE // 2) ** 2
    assert int(single["intersection"].sum()) > 0 and (single["act_total"] > 0).all()
    # and match the sorted-values definition of the threshold (spec §2.2)
    ds = BrodenDataset(root)
    with torch.no_grad():
        acts = torch.cat([_model()(x) for x, _ in _batches(ds)])
    raw = acts.transpose(0, 1).reshape(UNITS, -1).double().numpy()
    np.testing.assert_allclose(single["thresholds"].numpy(), np.quantile(raw, 1 - Q, axis=1), rtol=1e-6)
