"""Parity with the official implementation (torchscale 0.3.0), routing and init."""

import pytest
import torch

from beit3 import create_config, create_model
from beit3.heads import Beit3ForRetrieval
from tests.reference import build_reference


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every tensor a distinct, non-trivial value (biases and LN affine included), so a
    parameter that is unused or misplaced changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:
                continue
            if "layer_norm" in name or "ffn_layernorm" in name or "inner_attn_ln" in name:
                p.copy_(
                    (1.0 if name.endswith("weight") else 0.0)
                    + 0.2 * torch.randn(p.shape, generator=gen)
                )
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
                std = 0.5 if "embed" in name else fan_in**-0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _inputs(cfg, batch=3, length=12):
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    ids = torch.randint(4, 1000, (batch, length))
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, 9:] = True
    ids[pad] = 1
    return images, ids, pad


@pytest.mark.parametrize("preset", ["beit3-tiny", "beit3-base"])
def test_outputs_match_official_implementation(preset):
    cfg = create_config(preset)
    with torch.device("meta"):  # skip the init: every tensor is overwritten below
        ours = Beit3ForRetrieval(cfg)
    ours = ours.to_empty(device="cpu").eval()
    _randomize(ours)
    ref = build_reference(cfg, ours.state_dict())
    images, ids, pad = _inputs(cfg, batch=2 if preset == "beit3-base" else 3)
    with torch.no_grad():
        cases = {
            "vision": (
                ours.beit3(images=images).hidden_states,
                ref.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"],
            ),
            "text": (
                ours.beit3(text_ids=ids, padding_mask=pad).hidden_states,
                ref.beit3(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)[
                    "encoder_out"
                ],
            ),
            "joint": (
                ours.beit3(images=images, text_ids=ids, padding_mask=pad).hidden_states,
                ref.beit3(textual_tokens=ids, visual_tokens=images, text_padding_position=pad)[
                    "encoder_out"
                ],
            ),
            "image_embeds": (ours.encode_image(images), ref.encode_image(images)),
            "text_embeds": (ours.encode_text(ids, pad), ref.encode_text(ids, pad)),
        }
    for mode, (a, b) in cases.items():
        assert a.shape == b.shape, mode
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), f"{mode}: max abs error {err:.2e} (scale {scale:.1f})"


def test_state_dict_names_and_shapes_equal_official():
    cfg = create_config("beit3-base-384")
    with torch.device("meta"):
        ours = Beit3ForRetrieval(cfg)
        from tests.reference import ReferenceRetrieval

        ref = ReferenceRetrieval(cfg)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert a["beit3.encoder.embed_positions.A.weight"] == (579, 768)
    assert a["logit_scale"] == ()


def test_sdpa_and_eager_attention_agree():
    cfg = create_config("beit3-tiny")
    torch.manual_seed(0)
    sdpa = Beit3ForRetrieval(cfg).eval()
    _randomize(sdpa)
    eager = Beit3ForRetrieval(cfg.replace(attention="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    images, ids, pad = _inputs(cfg)
    with torch.no_grad():
        a = sdpa.beit3(images=images, text_ids=ids, padding_mask=pad).hidden_states
        b = eager.beit3(images=images, text_ids=ids, padding_mask=pad).hidden_states
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_text_only_forward_never_touches_vision_experts():
    model = create_model("beit3-tiny")
    _, ids, pad = _inputs(model.config)
    model.encode_text(ids, pad).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    vision = [
        n
        for n in grads
        if ".A." in n or n.startswith("beit3.vision_embed") or n == "vision_head.weight"
    ]
    language = [n for n in grads if ".B." in n and "embed_positions" not in n]
    assert vision and language
    assert all(grads[n] is None for n in vision)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in language)


def test_image_only_forward_never_touches_language_experts():
    model = create_model("beit3-tiny")
    images, _, _ = _inputs(model.config)
    model.encode_image(images).sum().backward()
    for name, p in model.named_parameters():
        if ".B." in name or name in ("beit3.text_embed.weight", "language_head.weight"):
            assert p.grad is None, name
        elif ".A." in name and "embed_positions" not in name:
            assert p.grad is not None, name


def test_embeddings_are_unit_norm_float32_and_ignore_padding_length():
    model = create_model("beit3-tiny").eval()
    images, ids, pad = _inputs(model.config)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(ids, pad)
        # Padding the same texts to 40 tokens (as the official code pads to 64) changes nothing.
        ids40 = torch.ones(ids.shape[0], 40, dtype=torch.long)
        ids40[:, : ids.shape[1]] = ids
        txt40 = model.encode_text(ids40, ids40.eq(1))
    assert img.dtype == txt.dtype == torch.float32
    assert img.shape == txt.shape == (3, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt, txt40, atol=1e-6, rtol=1e-5)


def test_joint_text_positions_restart_at_two():
    """In image+text mode the text uses rows 2.. of its own table, as in the official code."""
    model = create_model("beit3-tiny").eval()
    images, ids, pad = _inputs(model.config)
    with torch.no_grad():
        out = model.beit3(images=images, text_ids=ids, padding_mask=pad)
        table_b = model.beit3.encoder.embed_positions.B.weight
        table_b[2 : 2 + ids.shape[1]] += 1.0  # rows the text must use
        shifted = model.beit3(images=images, text_ids=ids, padding_mask=pad)
    assert out.num_vision_tokens == model.config.num_vision_tokens
    assert out.padding_mask.shape == (3, model.config.num_vision_tokens + ids.shape[1])
    assert not torch.allclose(out.hidden_states, shifted.hidden_states)


def test_init_is_deterministic_for_a_seed_and_follows_beit_scaling():
    torch.manual_seed(7)
    a = create_model("beit3-tiny").state_dict()
    torch.manual_seed(7)
    b = create_model("beit3-tiny").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    q = a["beit3.encoder.layers.1.self_attn.q_proj.A.weight"]
    fc2 = a["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    assert abs(q.std().item() - 0.0188) < 0.003  # N(0, 0.02) truncated at 2 sigma
    assert q.abs().max().item() <= 0.04 + 1e-7
    # Layer 2's output projections are scaled by 1/sqrt(2 * 2) (BEiT init).
    assert abs(fc2.std().item() / q.std().item() - 0.5) < 0.05
    assert a["beit3.encoder.layers.0.self_attn_layer_norm.A.weight"].eq(1).all()


def test_wrong_image_size_is_a_clear_error():
    model = create_model("beit3-tiny")
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\)"):
        model.encode_image(torch.zeros(1, 3, 64, 64))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("beit3-tiny").train()
    ckpt = create_model("beit3-tiny", use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    images, ids, pad = _inputs(plain.config)
    for m in (plain, ckpt):
        out = m(images, ids, pad)
        (out.image_embeds @ out.text_embeds.T).sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_first_token_only_equals_the_full_forward():
    cfg = create_config("beit3-tiny")
    model = Beit3ForRetrieval(cfg).eval()
    _randomize(model)
    images, ids, pad = _inputs(cfg)
    with torch.no_grad():
        for kwargs in (
            {"images": images},
            {"text_ids": ids, "padding_mask": pad},
            {"images": images, "text_ids": ids, "padding_mask": pad},
        ):
            full = model.beit3(**kwargs)
            first = model.beit3(**kwargs, first_token_only=True)
            expected = [full.hidden_states[:, :1]]
            if "images" in kwargs and "text_ids" in kwargs:
                expected.append(full.hidden_states[:, full.num_vision_tokens :][:, :1])
            torch.testing.assert_close(
                first.hidden_states, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5
            )
