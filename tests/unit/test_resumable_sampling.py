"""The training order and random streams behind exact resume (the kill-and-resume runs are in
tests/integration/test_resume.py)."""

import io
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from ovseg.data.samplers import EpochSeededSamples, ResumableShuffleSampler
from ovseg.utils import random_state


class Noisy(Dataset):
    """Each sample draws from the global numpy and python streams, as augmentations do."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index, float(np.random.rand()), random.random()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 4])
def test_order_is_distributed_samplers_and_keys_carry_the_epoch(world, epoch):
    dataset = Noisy()
    for rank in range(world):
        reference = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
        reference.set_epoch(epoch)
        ours = ResumableShuffleSampler(len(dataset), rank, world, seed=7)
        ours.set_epoch(epoch)
        keys = list(ours)
        assert [k % 10 for k in keys] == list(reference) and {k // 10 for k in keys} == {epoch}
        assert len(ours) == len(reference)


def test_resume_skips_what_was_seen_in_that_epoch_only():
    sampler = ResumableShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume(2, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # once
    sampler.resume(1, 4)  # a finished epoch: nothing to skip in this one
    assert list(sampler) == full


def test_a_sample_is_the_same_in_any_order_and_process():
    samples = EpochSeededSamples(Noisy(), seed=5)
    keys = [13, 2, 27, 2]
    first = [samples[k] for k in keys]
    np.random.seed(123), random.seed(9)  # whatever the streams were before
    again = [samples[k] for k in reversed(keys)][::-1]
    assert first == again and first[1] == first[3]
    assert samples[3][1:] != samples[13][1:]  # the same index in another epoch is augmented anew
    before = torch.get_rng_state()
    samples[5]
    assert torch.equal(torch.get_rng_state(), before)  # the model's torch stream is not the data's


def test_random_streams_round_trip_through_a_safe_checkpoint():
    module = torch.nn.Linear(2, 2)
    module.generator = torch.Generator().manual_seed(11)
    buffer = io.BytesIO()
    torch.save(random_state.capture(module), buffer)
    expected = (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist(),
                torch.rand(2, generator=module.generator).tolist())
    buffer.seek(0)
    random_state.restore(module, torch.load(buffer, weights_only=True))
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist(),
            torch.rand(2, generator=module.generator).tolist()) == expected


def _loader(dataset, world=1, rank=0):
    from ovseg.data.datamodule import ResumableLoader

    return ResumableLoader(EpochSeededSamples(dataset, 0), position=lambda: (1, 2), batch_size=2,
                           sampler=ResumableShuffleSampler(len(dataset), rank, world, seed=0))


def test_a_mid_epoch_resume_on_another_process_count_is_refused():
    """Each process skips what it trained on: 2 -> 1 processes trained samples twice, 1 -> 2 skipped some."""
    state = _loader(Noisy(), world=2).state_dict()
    assert state["processes"] == 2
    with pytest.raises(ValueError, match="cannot resume mid-epoch on 1 process.*written by 2"):
        _loader(Noisy(), world=1).load_state_dict(state)
    _loader(Noisy(), world=2, rank=1).load_state_dict(state)  # the same count: fine
    _loader(Noisy(), world=1).load_state_dict({**state, "batches": 0})  # at an epoch boundary: nothing to skip


def test_a_mid_epoch_resume_on_changed_training_data_is_refused(tmp_path):
    from ovseg.data.sa1b import SA1BFolder, write_synthetic_sa1b
    from ovseg.methods.pixelclip.data import SA1BDataset, PixelCLIPViews

    write_synthetic_sa1b(tmp_path / "all", num_images=6)  # sa_000000 .. sa_000002, two pairs each
    (tmp_path / "sa1b").mkdir()
    for part in ("sa_000000", "sa_000001"):
        (tmp_path / "all" / part).rename(tmp_path / "sa1b" / part)

    def dataset():
        return SA1BDataset("sa1b", SA1BFolder(tmp_path / "sa1b"), PixelCLIPViews(resize_short=40, crop_size=32))

    state = _loader(dataset()).state_dict()
    _loader(dataset()).load_state_dict(state)  # the same data
    (tmp_path / "all/sa_000002").rename(tmp_path / "sa1b/sa_000002")  # two pairs added before the resume
    with pytest.raises(ValueError, match="the training data changed since the checkpoint"):
        _loader(dataset()).load_state_dict(state)
    _loader(dataset()).load_state_dict({**state, "batches": 0})  # a new epoch takes the new data
