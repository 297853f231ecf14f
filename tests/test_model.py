import pytest
import torch
from torch import nn

from ddpm_engine.config import ModelConfig
from ddpm_engine.model import SelfAttention, UNet, build_model, count_parameters

# Small enough that every forward/backward here takes milliseconds.
SMALL = dict(preset="tiny", base_channels=8, channel_mults=(1, 2), norm_groups=4, time_embed_dim=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: a second thread only adds a barrier per op, and when the
    # other core is busy each barrier can cost a scheduler time slice (seconds per test).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(image_channels: int = 1, image_size: int = 8, **overrides) -> UNet:
    return build_model(ModelConfig(**{**SMALL, **overrides}), image_channels, image_size)


def perturb_output_conv(model: UNet) -> None:
    # conv_out starts at zero, which would hide every other parameter and t from the output.
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.1)


def res_blocks(model: UNet):
    return [m for m in model.modules() if hasattr(m, "time_projection")]


def time_mlp_parameters(model: UNet) -> int:
    return sum(
        p.numel() for name, p in model.named_parameters() if "time_projection" in name or "shared_time_mlp" in name
    )


@pytest.mark.parametrize("preset, target", [("tiny", 500_000), ("annotated", 50_000_000)])
def test_preset_parameter_count_near_target(preset, target):
    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset), image_channels=1, image_size=8)
    assert abs(count_parameters(model) / target - 1) <= 0.15


@pytest.mark.parametrize("image_size", [8, 16, 32])
@pytest.mark.parametrize("image_channels", [1, 3])
def test_output_shape_equals_input_shape(image_size, image_channels):
    model = build_model(ModelConfig(preset="tiny"), image_channels, image_size)
    x = torch.randn(2, image_channels, image_size, image_size)
    assert model(x, torch.tensor([1, 1000])).shape == x.shape


@pytest.mark.parametrize("image_size, mults", [(28, (1, 2, 2, 2)), (7, (1, 2, 2)), (5, (1, 1, 1))])
def test_odd_sides_are_halved_with_ceil_and_restored(image_size, mults):
    model = small_model(image_size=image_size, channel_mults=mults)
    x = torch.randn(2, 1, image_size, image_size)
    assert model(x, torch.tensor([3, 4])).shape == x.shape


def test_too_many_levels_for_the_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image_size 4 .*channel_mults \(1, 1, 1, 1\)"):
        small_model(image_size=4, channel_mults=(1, 1, 1, 1))


def test_shared_and_per_block_time_mlps_differ_and_both_run():
    shared = small_model(time_mlp="shared")
    per_block = small_model(time_mlp="per_block")
    assert shared.shared_time_mlp is not None and per_block.shared_time_mlp is None
    assert all(isinstance(b.time_projection, nn.Linear) for b in res_blocks(shared))
    assert all(isinstance(b.time_projection, nn.Sequential) for b in res_blocks(per_block))
    assert time_mlp_parameters(per_block) > time_mlp_parameters(shared)
    x = torch.randn(3, 1, 8, 8)
    for model in (shared, per_block):
        assert model(x, torch.tensor([1, 2, 3])).shape == x.shape


@pytest.mark.parametrize(
    "attention_resolutions, num_res_blocks, expected_sides",
    [
        ((), 1, []),
        ((8,), 1, [8, 8]),  # the top level's down block and up block
        ((4,), 2, [4, 4, 4, 4]),  # one per residual block, down and up
        ((2,), 1, [2, 2, 2]),  # the lowest level's down and up blocks, plus the middle
    ],
)
def test_attention_only_where_configured(attention_resolutions, num_res_blocks, expected_sides):
    # mults (1, 2, 2) at 8x8: levels at sides 8, 4 and 2, the middle at 2.
    model = small_model(
        channel_mults=(1, 2, 2),
        attention_resolutions=attention_resolutions,
        num_res_blocks=num_res_blocks,
    )
    seen_sides = []
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.register_forward_hook(lambda m, inputs, out: seen_sides.append(out.shape[-1]))
    model(torch.randn(2, 1, 8, 8), torch.tensor([5, 6]))
    assert sorted(seen_sides) == sorted(expected_sides)
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == len(expected_sides)


def test_annotated_preset_attends_at_low_resolution_only():
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="annotated"), image_channels=1, image_size=8)
    assert model.level_sides == (8, 4, 2)
    # Two blocks down + two up at side 4 and at side 2, plus the middle (side 2).
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 9


@pytest.mark.parametrize(
    "build",
    [
        lambda: small_model(time_mlp="shared", attention_resolutions=(8, 4), attention_heads=2),
        lambda: small_model(time_mlp="per_block", attention_resolutions=(8, 4), attention_heads=2),
        lambda: build_model(ModelConfig(preset="tiny"), image_channels=1, image_size=8),
    ],
    ids=["shared+attention", "per_block+attention", "tiny"],
)
def test_gradient_reaches_every_parameter(build):
    model = build()
    perturb_output_conv(model)
    model(torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 1000])).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    zero = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing and not zero


def test_output_conv_starts_at_zero():
    model = small_model()
    assert not model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).any()


@pytest.mark.parametrize("time_mlp", ["shared", "per_block"])
def test_output_depends_on_t(time_mlp):
    torch.manual_seed(0)
    model = small_model(time_mlp=time_mlp).eval()
    perturb_output_conv(model)
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 2, 900]))
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_group_norm_falls_back_to_a_divisor():
    model = small_model(base_channels=12, norm_groups=8)  # 12 and 24 channels
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups[12] == 6 and groups[24] == 8


def test_dropout_is_honoured():
    model = small_model(dropout=0.5)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_self_attention_matches_a_plain_reference(memory_format):
    torch.manual_seed(0)
    attention = SelfAttention(channels=8, heads=2, norm_groups=4)
    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=memory_format)
    qkv = attention.to_qkv(attention.norm(x)).flatten(2)  # [B, 3C, HW]
    q, k, v = (part.reshape(2, 2, 4, 15) for part in qkv.chunk(3, dim=1))  # [B, heads, d, HW]
    weights = torch.softmax(q.transpose(-1, -2) @ k / 4**0.5, dim=-1)  # [B, heads, HW, HW]
    mixed = (v @ weights.transpose(-1, -2)).reshape(2, 8, 3, 5)
    expected = x + attention.to_out(mixed)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_scalar_t_is_broadcast_over_the_batch():
    model = small_model()
    perturb_output_conv(model)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.full((3,), 7)))
