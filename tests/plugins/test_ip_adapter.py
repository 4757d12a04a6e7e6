"""IP-Adapter plugin: published files (written here by the tiny constructor) load through diffusers' own
loader and reproduce diffusers' IP-Adapter exactly; the pieces A4A uses are diffusers' own weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from PIL import Image

from xa_lightning.backbones import build_backbone
from xa_lightning.backbones.surgery import attention_layers
from xa_lightning.errors import UserError
from xa_lightning.plugins import ip_adapter as ipa


@pytest.fixture(scope="module")
def sd15():
    return build_backbone("sd15", "tiny", seed=0)


@pytest.fixture(scope="module")
def encoder():
    return ipa.tiny_image_encoder(seed=0)


def _inputs(batch: int = 2, latent: int = 8, text_dim: int = 32):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, latent, latent, generator=generator),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 77, text_dim, generator=generator),
        torch.rand(batch, 3, 64, 64, generator=generator),
    )


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_published_layout_round_trips(sd15, encoder, tmp_path, kind, suffix):
    path = ipa.write_random_ip_adapter(tmp_path / f"ip-adapter{suffix}", sd15.denoiser, encoder, kind=kind, seed=3)
    if suffix == ".bin":
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"image_proj", "ip_adapter"}
        numbers = sorted({int(k.split(".")[0]) for k in raw["ip_adapter"]})
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path))
        assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in raw)
        numbers = sorted({int(k.split(".")[1]) for k in raw if k.startswith("ip_adapter.")})
    assert numbers == list(range(1, 32, 2))  # SD1.5 layout: 16 cross-attention layers, odd numbers
    layout = ipa.read_ip_adapter(path)
    layers = attention_layers(sd15.denoiser, "cross")
    assert layout.kind == kind and layout.num_layers == 16
    assert layout.num_tokens == (16 if kind == "plus" else 4)
    assert layout.layer_dims == [layer.inner_dim for layer in layers]
    assert layout.cross_attention_dim == 32
    assert layout.image_embed_dim == (encoder.hidden_size if kind == "plus" else encoder.embed_dim)
    # the model built by diffusers' converter writes back the same published tensors
    again = ipa.IPAdapterModel.from_layout(layout).to_layout()
    assert set(again.image_proj) == set(layout.image_proj)
    assert all(torch.equal(again.image_proj[k], v) for k, v in layout.image_proj.items())
    assert all(torch.equal(a, b) for a, b in zip(again.to_k_ip + again.to_v_ip, layout.to_k_ip + layout.to_v_ip))


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_loads_like_diffusers_and_restores_the_unet(sd15, encoder, tmp_path, kind):
    """Our loading == diffusers' pipe.load_ip_adapter on the same file, bit for bit; removing restores."""
    path = ipa.write_random_ip_adapter(tmp_path / "ip-adapter.bin", sd15.denoiser, encoder, kind=kind, seed=1)
    latents, timesteps, text, references = _inputs()
    features = encoder.features(references, hidden_states=kind == "plus")
    unet = sd15.denoiser
    diffusers_unet = copy.deepcopy(unet)
    processors = dict(unet.attn_processors)
    keys = set(unet.state_dict())
    with torch.no_grad():
        before = unet(latents, timesteps, text).sample
        with ipa.load_into_unet(unet, path):
            assert isinstance(
                unet.attn_processors[f"{attention_layers(unet)[0].name}.processor"], IPAdapterAttnProcessor2_0
            )
            ours = unet(latents, timesteps, text, added_cond_kwargs={"image_embeds": ipa.unet_image_embeds(features)})
        after = unet(latents, timesteps, text).sample
        pipe = sd15.pipeline()
        pipe.register_modules(unet=diffusers_unet)
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
        theirs = diffusers_unet(
            latents, timesteps, text, added_cond_kwargs={"image_embeds": ipa.unet_image_embeds(features)}
        )
    assert torch.equal(ours.sample, theirs.sample)
    assert not torch.allclose(ours.sample, before, atol=1e-4), "the image prompt changed nothing"
    assert torch.equal(after, before)
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert all(unet.attn_processors[name] is proc for name, proc in processors.items())
    assert set(unet.state_dict()) == keys


def test_pipeline_with_published_files_matches_diffusers_load_ip_adapter(sd15, encoder, tmp_path):
    """A published folder (weights + image_encoder/) through diffusers' pipe.load_ip_adapter vs our loaders."""
    encoder.encoder.save_pretrained(tmp_path / "image_encoder")
    ipa.write_random_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", sd15.denoiser, encoder, seed=2)
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    kwargs = dict(
        prompt=["a face"], ip_adapter_image=image, num_inference_steps=2, guidance_scale=3.0, output_type="pt"
    )

    theirs_pipe = sd15.pipeline()
    theirs_pipe.register_modules(unet=copy.deepcopy(sd15.denoiser))
    theirs_pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter_sd15.safetensors")
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    loaded = ipa.load_image_encoder(tmp_path / "image_encoder", key="method.pta.image_encoder")
    pipe = sd15.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with ipa.load_into_unet(sd15.denoiser, tmp_path / "ip-adapter_sd15.safetensors"):
        with ipa.pipeline_image_encoder(pipe, loaded):
            ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ours, theirs)
    assert pipe.image_encoder is None  # the pipeline is given back as it was


def test_exposed_pieces_are_diffusers_attention(sd15, encoder, tmp_path):
    """Image tokens and per-layer to_k_ip / to_v_ip, in cross-attention order, are what diffusers' processors run:
    Attn(q, text) + Attn(q, W_k^i c, W_v^i c) through to_out reproduces IPAdapterAttnProcessor2_0."""
    path = ipa.write_random_ip_adapter(tmp_path / "ip.bin", sd15.denoiser, encoder, seed=4)
    model = ipa.IPAdapterModel.from_layout(ipa.read_ip_adapter(path))
    _, _, text, references = _inputs()
    features = encoder.features(references)
    unet = sd15.denoiser
    layers = attention_layers(unet, "cross")
    with torch.no_grad(), ipa.load_into_unet(unet, path):
        tokens = model.tokens(features)
        assert torch.equal(tokens, unet.encoder_hid_proj(ipa.unet_image_embeds(features))[0][:, 0])
        keys, values = model.layer_keys_values(tokens)
        for index, layer in enumerate(layers):
            processor = unet.attn_processors[layer.processor_name]
            assert torch.equal(processor.to_k_ip[0].weight, model.to_k_ip[index].weight)
            assert torch.equal(processor.to_v_ip[0].weight, model.to_v_ip[index].weight)
        layer = layers[-1]
        attn = layer.module
        hidden = torch.randn(2, 16, layer.query_dim)
        expected = processor(attn, hidden, encoder_hidden_states=(text, [tokens.unsqueeze(1)]))
        heads = attn.heads

        def split(x):
            return x.view(2, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        image_attention = F.scaled_dot_product_attention(split(attn.to_q(hidden)), split(keys[-1]), split(values[-1]))
        image_attention = image_attention.transpose(1, 2).reshape(2, -1, layer.inner_dim)
        manual = AttnProcessor2_0()(attn, hidden, text) + F.linear(image_attention, attn.to_out[0].weight)
    assert torch.allclose(manual, expected, atol=1e-5)


def test_sdxl_layout_loads_into_the_sdxl_unet(encoder, tmp_path):
    sdxl = build_backbone("sdxl", "tiny", seed=0)
    unet = sdxl.denoiser
    path = ipa.write_random_ip_adapter(tmp_path / "ip-adapter_sdxl.bin", unet, encoder, seed=5)
    layout = ipa.read_ip_adapter(path)
    assert layout.num_layers == len(attention_layers(unet)) and layout.cross_attention_dim == 64
    latents, timesteps, _, references = _inputs(latent=16)
    cond = sdxl.encode_text(["a face", "a cat"])
    added = sdxl.added_cond_kwargs(cond)
    with torch.no_grad():
        plain = sdxl.predict(latents, timesteps, cond, added)
        with ipa.load_into_unet(unet, layout, scale=0.0):  # scale 0: diffusers skips the image branch
            image_embeds = ipa.unet_image_embeds(encoder.features(references))
            zero = sdxl.predict(latents, timesteps, cond, {**added, "image_embeds": image_embeds})
            ipa.set_ip_adapter_scale(unet, 1.0)
            full = sdxl.predict(latents, timesteps, cond, {**added, "image_embeds": image_embeds})
    assert torch.equal(zero, plain) and not torch.allclose(full, plain, atol=1e-4)


def test_tensor_preprocessing_matches_clip_image_processor(encoder):
    """At the encoder's own size there is no resampling: pixel values equal CLIPImageProcessor's."""
    array = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    expected = encoder.processor(images=Image.fromarray(array), return_tensors="pt").pixel_values
    ours = encoder.preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert encoder.preprocess(torch.rand(3, 3, 70, 50)).shape == (3, 3, 32, 32)


def test_bad_files_are_one_line(sd15, encoder, tmp_path):
    with pytest.raises(UserError, match="method.pta.weights") as error:
        ipa.read_ip_adapter(tmp_path / "missing.bin", key="method.pta.weights")
    assert "\n" not in str(error.value)
    torch.save({"proj.weight": torch.zeros(2, 2)}, tmp_path / "other.bin")
    with pytest.raises(UserError, match="image_proj"):
        ipa.read_ip_adapter(tmp_path / "other.bin")
    layout = ipa.random_ip_adapter(sd15.denoiser, encoder).to_layout()
    incomplete = layout.flat()
    del incomplete["ip_adapter.31.to_v_ip.weight"]
    with pytest.raises(UserError, match="numbered"):
        ipa.parse_ip_adapter(incomplete)
    sdxl_unet = build_backbone("sdxl", "tiny").denoiser
    with pytest.raises(UserError, match="16 cross-attention layers"):
        ipa.load_into_unet(sdxl_unet, layout)
    with pytest.raises(UserError, match="image_encoder"):
        ipa.load_image_encoder(tmp_path, key="method.pta.image_encoder")
