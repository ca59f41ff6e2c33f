"""ShapeDataModule: shard round trip, exactly-once validation, resampled training, corrupt input, resume seed;
the memory-mapped local shard reader against webdataset's, and the zero-copy .npy reader."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from fvdm.config import DataConfig
from fvdm.data.datamodule import BadDataError, ShapeDataModule, expand_shards, world_info
from fvdm.data.shards import (MalformedSample, ShapeSample, ShardError, ShardWriter, decode_sample, encode_sample,
                              iter_tar, npy_array, read_samples, shard_pattern)


def make_sample(key: str, rng: np.random.Generator, n_sharp: int = 5, renders: int = 2, n_surface: int = 20,
                **override: np.ndarray) -> ShapeSample:
    """Random arrays of the schema's shapes; renders are solid colours so a chosen one is recognisable."""
    fields = dict(
        surface=rng.normal(size=(n_surface, 6)).astype(np.float32),
        sharp=rng.normal(size=(n_sharp, 6)).astype(np.float32),
        vol=rng.uniform(-1, 1, size=(30, 4)).astype(np.float32),
        near=rng.uniform(-1, 1, size=(25, 4)).astype(np.float32),
    )
    fields.update(override)
    images = [np.full((8, 6, 3), rng.integers(256, size=3), np.uint8) for _ in range(renders)]
    return ShapeSample(key=key, renders=images, meta={"source": f"{key}.obj"}, **fields)


def write(out: Path, samples: list[ShapeSample], per_shard: int) -> str:
    with ShardWriter(out, max_count=per_shard) as w:
        for s in samples:
            w.write(s)
    return shard_pattern(out)


def write_raw(path: Path, raws: list[dict]) -> None:
    """A tar of raw member dicts (``__key__`` + ``ext -> bytes``), for members ShardWriter would not write."""
    with tarfile.open(path, "w") as tar:
        for raw in raws:
            for ext, data in raw.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def config(train: str, val: str | None = None, **kw) -> DataConfig:
    base = dict(train=train, val=val or train, batch_size=2, val_batch_size=2, num_workers=0, shuffle_buffer=4,
                num_surface=8, num_sharp=4, num_vol=6, num_near=5, max_bad_fraction=1.0)
    return DataConfig(**{**base, **kw})


def rows_in(rows: np.ndarray, table: np.ndarray) -> bool:
    """Every row of ``rows`` is (exactly) a row of ``table``."""
    return all((table == r).all(axis=1).any() for r in rows)


def test_round_trip_shapes_values_and_images(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample("a0", rng), make_sample("a1", rng, n_sharp=0, n_surface=3),
               make_sample("a2", rng, renders=0), make_sample("a3", rng)]
    by_key = {s.key: s for s in samples}
    pattern = write(tmp_path, samples, per_shard=2)
    dm = ShapeDataModule(config(pattern))

    batches = list(dm.val_dataloader())
    assert [b["key"] for b in batches] == [["a0", "a1"], ["a2", "a3"]]
    first = batches[0]
    assert first["surface"].shape == (2, 12, 7) and first["surface"].dtype == torch.float32
    assert first["vol"].shape == (2, 6, 4) and first["near"].shape == (2, 5, 4)
    assert first["image"].shape == (2, 3, 8, 6) and first["image"].dtype == torch.float32
    assert "image" not in batches[1]  # a2 has no renders, so the batch has no image
    for b in batches:
        for i, key in enumerate(b["key"]):
            s, surf = by_key[key], b["surface"][i].numpy()
            assert rows_in(surf[:8, :6], s.surface) and (surf[:8, 6] == 0).all()
            if len(s.sharp):
                assert rows_in(surf[8:, :6], s.sharp) and (surf[8:, 6] == 1).all()
            else:  # no sharp edges: drawn from the uniform surface with flag 0 (3 points -> with replacement)
                assert rows_in(surf[8:, :6], s.surface) and (surf[8:, 6] == 0).all()
            assert rows_in(b["vol"][i].numpy(), s.vol) and rows_in(b["near"][i].numpy(), s.near)
    assert len(np.unique(batches[0]["surface"][0, :8].numpy(), axis=0)) == 8  # enough points: no replacement
    expected = torch.from_numpy(by_key["a0"].renders[0]).permute(2, 0, 1).float() / 255  # val uses render 0
    assert torch.equal(first["image"][0], expected)

    again = list(dm.val_dataloader())  # validation subsampling is seeded by key: reproducible
    assert all(torch.equal(x[k], y[k]) for x, y in zip(batches, again) for k in ("surface", "vol", "near"))

    train = iter(dm.train_dataloader())
    colours = {k: {tuple(r[0, 0]) for r in s.renders} for k, s in by_key.items()}
    for _ in range(6):
        b = next(train)
        if "image" in b:
            for key, img in zip(b["key"], b["image"]):
                assert tuple((img[:, 0, 0] * 255).round().to(torch.uint8).tolist()) in colours[key]


@pytest.mark.parametrize("per_shard,n", [(3, 13), (64, 7)], ids=["5-shards", "1-shard"])
def test_validation_exactly_once_over_2_ranks_x_2_workers(tmp_path, per_shard, n):
    rng = np.random.default_rng(1)
    keys = [f"s{i:03d}" for i in range(n)]
    pattern = write(tmp_path, [make_sample(k, rng, renders=0) for k in keys], per_shard)
    assert len(expand_shards(pattern)) == (5 if per_shard == 3 else 1)
    dm = ShapeDataModule(config(pattern, val_batch_size=2, num_workers=2))
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        loader = DataLoader(dm.val_dataset(rank=rank, world=2), batch_size=None, num_workers=2)
        seen[rank] = [k for b in loader for k in b["key"]]
    union = seen[0] + seen[1]
    assert sorted(union) == keys  # all keys, none twice
    for rank, got in seen.items():  # each rank gets its share of positions j (mod 4), even from 1 shard
        assert len(got) == sum(1 for j in range(n) if j % 4 // 2 == rank)


def test_validation_cap_keeps_first_samples_once(tmp_path):
    rng = np.random.default_rng(2)
    keys = [f"c{i:02d}" for i in range(9)]
    pattern = write(tmp_path, [make_sample(k, rng, renders=0) for k in keys], per_shard=4)
    dm = ShapeDataModule(config(pattern, val_max_samples=5))
    got = [k for rank in range(2) for b in dm.val_dataset(rank=rank, world=2) for k in b["key"]]
    assert sorted(got) == keys[:5]


def test_train_stream_is_infinite_and_differs_by_rank_and_worker(tmp_path):
    rng = np.random.default_rng(3)
    pattern = write(tmp_path, [make_sample(f"t{i}", rng, renders=0) for i in range(6)], per_shard=3)
    dm = ShapeDataModule(config(pattern, shuffle_buffer=2))

    def keys(rank: int, n: int = 15) -> list[str]:  # 15 batches of 2 = 30 samples from 6: the stream repeats
        it = iter(dm.train_dataset(rank=rank, world=2))
        return [k for _ in range(n) for k in next(it)["key"]]

    r0, r1 = keys(0), keys(1)
    assert len(r0) == 30 and set(r0) <= {f"t{i}" for i in range(6)}
    assert r0 == keys(0)  # deterministic per (seed, rank, worker, step offset)
    assert r0 != r1

    dm2 = ShapeDataModule(config(pattern, shuffle_buffer=2, num_workers=2))
    it = iter(dm2.train_dataloader())  # workers' batches arrive in turn: even from worker 0, odd from 1
    batches = [next(it)["key"] for _ in range(12)]
    assert batches[0::2] != batches[1::2]


def test_corrupt_shard_and_malformed_samples_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(4)
    good = [make_sample(f"g{i}", rng) for i in range(4)]
    malformed = [
        make_sample("bad_width", rng, vol=np.zeros((30, 3), np.float32)),
        make_sample("bad_nan", rng, near=np.full((25, 4), np.nan, np.float32)),
    ]
    write(tmp_path, good[:2] + malformed + good[2:], per_shard=8)  # shard-000000.tar
    write(tmp_path, [make_sample(f"cut{i}", rng) for i in range(4)], per_shard=8)  # shard-000001.tar
    broken = tmp_path / "shard-000001.tar"
    cut = broken.stat().st_size // 3
    with tarfile.open(broken) as tar:  # which members survive the cut: samples with all 7 survive whole
        members = [(m.name.split(".")[0], m.offset_data + m.size <= cut) for m in tar]
    whole = [k for k in dict(members) if all(ok for key, ok in members if key == k)]
    partial = {k for k, ok in members if ok} - set(whole)
    broken.write_bytes(broken.read_bytes()[:cut])
    dm = ShapeDataModule(config(str(tmp_path)))

    batches = list(dm.val_dataset())
    got = [k for b in batches for k in b["key"]]
    assert got == [s.key for s in good] + whole
    # two malformed samples, the lost rest of the truncated shard, and its partial sample (missing fields)
    assert int(batches[-1]["n_bad"]) == 3 + len(partial)
    assert int(batches[-1]["n_seen"]) == int(batches[-1]["n_bad"]) + len(got)


def test_too_many_bad_samples_stops_with_a_clear_error(tmp_path):
    rng = np.random.default_rng(5)
    samples = [make_sample(f"m{i:02d}", rng, renders=0, **({"surface": np.zeros((0, 6), np.float32)} if i % 3 == 0
                                                           else {})) for i in range(30)]
    write(tmp_path, samples, per_shard=30)
    dm = ShapeDataModule(config(str(tmp_path), max_bad_fraction=0.2, num_workers=1))
    with pytest.raises(BadDataError, match=r"shard-000000\.tar.*") as err:
        list(dm.val_dataloader())
    message = str(err.value)
    assert "max_bad_fraction=0.2" in message and "field 'surface' is empty" in message and "%" in message

    dm_ok = ShapeDataModule(config(str(tmp_path), max_bad_fraction=0.5))  # 10 of 30 bad is under 50 %
    assert sum(len(b["key"]) for b in dm_ok.val_dataset()) == 20


def test_state_dict_round_trip_reseeds_the_train_stream(tmp_path):
    rng = np.random.default_rng(6)
    pattern = write(tmp_path, [make_sample(f"r{i}", rng, renders=0) for i in range(8)], per_shard=2)

    def first_keys(dm: ShapeDataModule) -> list[str]:
        it = iter(dm.train_dataset(rank=0, world=1))
        return [k for _ in range(8) for k in next(it)["key"]]

    dm = ShapeDataModule(config(pattern))
    fresh = first_keys(dm)
    assert dm.state_dict() == {"step_offset": 0}
    dm.load_state_dict({"step_offset": 1234})
    assert dm.state_dict() == {"step_offset": 1234}
    resumed = first_keys(dm)
    assert resumed != fresh
    restored = ShapeDataModule(config(pattern))
    restored.load_state_dict(dm.state_dict())
    assert first_keys(restored) == resumed


def test_sources_pipe_urls_missing_files_and_world_info(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    write(tmp_path, [make_sample(f"p{i}", rng, renders=0) for i in range(3)], per_shard=2)
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    piped = f"pipe:cat {tmp_path / 'shard-000000.tar'}::pipe:cat {tmp_path / 'shard-000001.tar'}"
    got = [k for b in ShapeDataModule(config(piped)).val_dataset() for k in b["key"]]
    assert got == ["p0", "p1", "p2"]
    with pytest.raises(FileNotFoundError, match=r"data.train: shard .*shard-000009.tar not found"):
        ShapeDataModule(config(str(tmp_path / "shard-{000000,000009}.tar"))).train_dataset()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world_info() == (1, 2)
    assert ShapeDataModule(config(str(tmp_path))).val_dataset().rank == 1


class TinyStage(L.LightningModule):
    """Just enough of a stage to run steps on ShapeDataModule batches."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        self.log("data/bad_fraction", batch["n_bad"].float() / batch["n_seen"].float().clamp(min=1))
        return self.layer(batch["vol"]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/loss", self.layer(batch["near"]).pow(2).mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_checkpoint_carries_the_step_offset(tmp_path):
    rng = np.random.default_rng(8)
    pattern = write(tmp_path / "shards", [make_sample(f"l{i}", rng, renders=0) for i in range(4)], per_shard=2)
    dm = ShapeDataModule(config(pattern))
    trainer = L.Trainer(max_steps=3, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(TinyStage(), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["ShapeDataModule"]
    assert state == {"step_offset": 3}

    resumed = ShapeDataModule(config(pattern))
    trainer = L.Trainer(max_steps=5, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(TinyStage(), datamodule=resumed, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 5
    assert trainer.train_dataloader.dataset.step_offset == 3  # the stream was built after the restore


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def test_npy_array_is_a_zero_copy_view_and_rejects_bad_payloads():
    for a in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 6), np.float32),
              np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(5, dtype=">f4")):
        raw = npy(a)
        got = npy_array(raw)
        assert got.dtype == a.dtype and got.shape == a.shape and (got == a).all()
        assert not got.flags.writeable and (a.size == 0 or np.shares_memory(got, np.frombuffer(raw, np.uint8)))
    raw = npy(np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="too short"):
        npy_array(raw[:-1])
    with pytest.raises(ValueError, match="magic"):
        npy_array(b"PK\x03\x04 not an npy file at all")
    with pytest.raises(ValueError, match="object"):
        npy_array(npy(np.array([{"a": 1}], dtype=object)))


def test_local_reader_matches_webdataset_and_decodes_without_copies(tmp_path):
    rng = np.random.default_rng(9)
    long_key = "k" * 120  # a member name over 100 characters: tarfile writes a pax header for it
    raws = [encode_sample(make_sample(k, rng)) for k in ("plain", long_key, "sub/dir/nested")]
    write_raw(tmp_path / "mixed.tar", raws)
    ours = list(read_samples(tmp_path / "mixed.tar"))
    theirs = list(wds.tarfile_to_samples()(iter([{"url": str(tmp_path / "mixed.tar")}])))
    assert [r["__key__"] for r in ours] == [r["__key__"] for r in theirs] == [r["__key__"] for r in raws]
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() and all(bytes(a[k]) == b[k] for k in a if not k.startswith("__"))
    sample = decode_sample(ours[1])
    expected = decode_sample(theirs[1])
    assert (sample.vol == expected.vol).all() and not sample.vol.flags.writeable
    assert all((x == y).all() for x, y in zip(sample.renders, expected.renders)) and sample.meta == expected.meta


@pytest.mark.parametrize("damage", ["data cut", "header cut", "sample boundary", "empty", "not a tar"])
def test_damaged_local_shard_counts_once_and_keeps_whole_samples(tmp_path, damage):
    rng = np.random.default_rng(10)
    write(tmp_path, [make_sample(f"ok{i}", rng, renders=0) for i in range(3)], per_shard=8)  # shard-000000.tar
    write(tmp_path, [make_sample(f"dm{i}", rng, renders=1) for i in range(4)], per_shard=8)  # shard-000001.tar
    broken = tmp_path / "shard-000001.tar"
    with tarfile.open(broken) as tar:
        members = [(m.name.split(".")[0], m.offset, m.offset_data + m.size) for m in tar]  # key, header, end
    per = len(members) // 4  # members per sample (4 arrays, a render, meta.json)
    cut = {"data cut": members[per + 2][2] - 7,  # inside the data of sample 1's 3rd member
           "header cut": members[per + 2][1] + 100,  # inside the header of that member
           "sample boundary": members[2 * per][1],  # where sample 2 starts: no end-of-archive block follows
           "empty": 0, "not a tar": 0}[damage]
    data = broken.read_bytes()[:cut] if damage != "not a tar" else b"this is not a tar file\n" * 100
    broken.write_bytes(data)
    keys = list(dict.fromkeys(key for key, _, _ in members))
    whole = [k for k in keys if all(end <= cut for key, _, end in members if key == k)]
    partial = {key for key, _, end in members if end <= cut} - set(whole)

    batches = list(ShapeDataModule(config(str(tmp_path), val_batch_size=16)).val_dataset())
    got = [k for b in batches for k in b["key"]]
    assert got == ["ok0", "ok1", "ok2"] + whole
    assert len(partial) == (1 if "cut" in damage else 0)
    assert int(batches[-1]["n_bad"]) == 1 + len(partial)  # the damaged shard once, a cut sample once more
    with pytest.raises(ShardError, match="shard-000001.tar"):
        list(read_samples(broken))


def test_nonfinite_values_are_checked_in_drawn_rows_only_and_renders_only_when_wanted(tmp_path):
    rng = np.random.default_rng(11)
    sharp_nan = make_sample("sharp_nan", rng, sharp=np.full((5, 6), np.nan, np.float32))
    bad_png = encode_sample(make_sample("bad_png", rng)) | {"render_00.png": b"\x89PNG broken"}
    raws = [encode_sample(make_sample("fine", rng)), encode_sample(sharp_nan), bad_png]
    write_raw(tmp_path / "shard-000000.tar", raws)

    with pytest.raises(MalformedSample, match="field 'sharp' has non-finite values"):
        decode_sample(next(r for r in iter_tar(tmp_path / "shard-000000.tar") if r["__key__"] == "sharp_nan"))

    def keys_and_bad(**kw) -> tuple[list[str], int, bool]:
        dm = ShapeDataModule(config(str(tmp_path), val_batch_size=16, **kw), images=kw.pop("images", True))
        (batch,) = list(dm.val_dataset())
        return batch["key"], int(batch["n_bad"]), "image" in batch

    # sharp rows are never drawn with num_sharp=0: the NaN goes unnoticed in streaming (inspect finds it)
    assert keys_and_bad(num_sharp=0) == (["fine", "sharp_nan"], 1, True)  # the broken render counts
    assert keys_and_bad(num_sharp=4) == (["fine"], 2, True)
    dm = ShapeDataModule(config(str(tmp_path), val_batch_size=16, num_sharp=0), images=False)
    (batch,) = list(dm.val_dataset())  # renders left undecoded: the broken one is not even read
    assert batch["key"] == ["fine", "sharp_nan", "bad_png"] and "image" not in batch and int(batch["n_bad"]) == 0


def test_render_index_fixes_the_condition_render(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(f"s{i}", rng, renders=3) for i in range(4)]
    spec = write(tmp_path, samples, per_shard=4)
    first = {s.key: s.renders[0][0, 0] for s in samples}
    loader = ShapeDataModule(config(spec, batch_size=4, render_index=0)).train_dataloader()
    for batch, _ in zip(loader, range(3)):
        for key, image in zip(batch["key"], batch["image"]):
            assert torch.equal(image[:, 0, 0], torch.from_numpy(first[key]).float() / 255)
