"""The compact format: bit-exact round trips, a model that loads in one call, and clear errors on bad files."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sparsegpt import PruneConfig, QuantGrid, load_pretrained, pack_folder, unpack_folder
from sparsegpt.api import quant_specs
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.compact import (
    MANIFEST,
    QUANT_SIDECAR,
    QuantSpec,
    decode_tensor,
    encode_tensor,
    pack_bits,
    same_bits,
    unpack_bits,
    write_quant_sidecar,
)
from sparsegpt.pipeline import prune_model
from sparsegpt.solver import NMPattern, sparsegpt_prune

from reference import problem
from tiny import VOCAB, tiny_model, tiny_tokenizer


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 50), seed=st.integers(0, 1000))
def test_bit_streams_round_trip(bits, count, seed):
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_bit_stream_layout_is_little_endian():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]  # 01, 10, 11 from the low bits up


def round_trip(tensor, quant=None, patterns=((2, 4), (4, 8))):
    entry, parts = encode_tensor("w", tensor, quant, patterns)
    decoded = decode_tensor("w", json.loads(json.dumps(entry)), parts.__getitem__)
    assert same_bits(decoded, tensor), entry
    return entry, parts


def sparse(shape, share, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator).to(dtype)
    return tensor.masked_fill(torch.rand(shape, generator=generator) < share, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_encoding_round_trips_bit_for_bit(dtype):
    dense = torch.randn(8, 16).to(dtype)
    assert round_trip(dense)[0]["encoding"] == "plain"
    entry, parts = round_trip(sparse((8, 16), 0.5, dtype))
    assert entry["encoding"] == "bitmask" and parts["w::mask"].numel() == 16
    two_four = magnitude_nm(torch.randn(6, 16).to(dtype), 2, 4)
    two_four[0, :4] = 0.0  # a group with more zeros than N still packs (zeros fill the kept slots)
    entry, parts = round_trip(two_four)
    assert (entry["encoding"], entry["n"], entry["m"], entry["transposed"]) == ("nm", 2, 4, False)
    assert parts["w::values"].numel() == 6 * 16 // 2 and parts["w::positions"].numel() == 6 * 16 // 2 * 2 // 8
    entry, _ = round_trip(magnitude_nm(torch.randn(16, 6).to(dtype).T.contiguous(), 2, 4).T.contiguous())
    assert entry["encoding"] == "nm" and entry["transposed"]  # GPT-2 Conv1D weights hold the groups in dim 0
    entry, _ = round_trip(magnitude_nm(torch.randn(4, 16).to(dtype), 4, 8), patterns=((4, 8),))
    assert entry["encoding"] == "nm" and entry["m"] == 8
    experts = sparse((3, 4, 8), 0.6, dtype)
    assert round_trip(experts)[0]["encoding"] == "bitmask"
    signed = sparse((4, 8), 0.5, dtype)
    signed[0, 0] = -0.0  # a negative zero is a stored bit pattern, kept as a value
    round_trip(signed)


def magnitude_nm(tensor, n, m):
    rows, cols = tensor.shape
    groups = tensor.reshape(rows, cols // m, m).clone()
    smallest = groups.abs().topk(n, dim=2, largest=False).indices
    return groups.scatter(2, smallest, 0.0).reshape(rows, cols)


@pytest.mark.parametrize("pattern, group", [(None, 16), (NMPattern(2, 4), 8), (None, None), (None, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weights_pack_as_codes(pattern, group, dtype):
    weight, hessian, _ = problem(8, 32)
    result = sparsegpt_prune(weight.float(), hessian.float(), 0.5, pattern, 16, grid=QuantGrid(4, group))
    stored = result.weight.to(dtype)
    quant = QuantSpec(QuantGrid(4, group), result.scales.half(), result.zeros.to(torch.uint8))
    entry, parts = round_trip(stored, quant)
    assert entry["quant"]["bits"] == 4 and parts["w::codes"].numel() == 8 * 32 // 2 // 2
    off_grid = stored.clone()
    off_grid[result.weight != 0] *= 1.01
    with pytest.raises(SparseGPTError, match="w: the weights are not on the quantization grid"):
        encode_tensor("w", off_grid, quant)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Plain folders of a tiny llama: unpruned, 50% bf16, 2:4, 50% + 4 bit and GPTQ 3 bit; and a gpt2 at 2:4."""
    root = tmp_path_factory.mktemp("compact")
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    made = {}
    for name, arch, config, dtype in [
        ("dense", "llama", None, torch.float32),
        ("half", "llama", PruneConfig(blocksize=16), torch.bfloat16),
        ("2:4", "llama", PruneConfig(pattern=NMPattern(2, 4), blocksize=16), torch.float32),
        ("quant", "llama", PruneConfig(blocksize=16, bits=4, group_size=16), torch.float16),
        ("gptq", "llama", PruneConfig(sparsity=0.0, blocksize=16, bits=3, symmetric=True), torch.float32),
        ("gpt2", "gpt2", PruneConfig(pattern=NMPattern(2, 4), blocksize=16, bits=4), torch.float32),
    ]:
        model = tiny_model(arch, dtype=dtype)
        if config is not None:
            records = prune_model(model, config, calibration)
        folder = root / name.replace(":", "-")
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        if config is not None and config.bits:
            write_quant_sidecar(folder, quant_specs(model, records, config))
        made[name] = folder
    return made


def decoder_matrices(manifest):
    """Entries of the 2-D weights inside decoder blocks (llama: model.layers.*, gpt2: transformer.h.*)."""
    return [
        entry
        for key, entry in manifest["tensors"].items()
        if (".layers." in key or ".h." in key) and key.endswith(".weight") and len(entry["shape"]) == 2
    ]


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("name", ["dense", "half", "2:4", "quant", "gptq", "gpt2"])
def test_unpack_of_pack_is_bitwise_equal_and_loads_in_one_call(folders, tmp_path, name):
    plain = folders[name]
    manifest = pack_folder(plain, tmp_path / "compact")
    unpack_folder(tmp_path / "compact", tmp_path / "back")
    original, restored = tensors(plain), tensors(tmp_path / "back")
    assert original.keys() == restored.keys()
    for key in original:
        assert same_bits(original[key], restored[key]), key
    if name != "dense":
        encodings = {entry["encoding"] for entry in decoder_matrices(manifest)}
        assert encodings <= {"bitmask", "nm", "full"} and encodings
        assert ("full" in encodings) == (name == "gptq")
    if name in ("quant", "gptq", "gpt2"):
        assert (tmp_path / "back" / QUANT_SIDECAR).is_file()
        assert any(entry.get("quant") for entry in manifest["tensors"].values())
    reference = load_pretrained(plain)
    loaded = load_pretrained(tmp_path / "compact")
    assert type(loaded) is type(reference)
    for key, value in reference.state_dict().items():
        assert same_bits(loaded.state_dict()[key], value), key
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_folders_load_with_their_experts_fused(tmp_path, arch):
    # save_pretrained writes each expert apart, and transformers fuses them into banks while loading (and
    # renames Mixtral's block_sparse_moe to mlp): the compact reader must map the stored names the same way
    model = tiny_model(arch)
    prune_model(model, PruneConfig(blocksize=16), torch.randint(0, VOCAB, (4, 16)))
    model.save_pretrained(tmp_path / "plain")
    manifest = pack_folder(tmp_path / "plain", tmp_path / "compact")
    assert any(".experts.0." in key for key in manifest["tensors"])  # stored one expert at a time
    reference, loaded = load_pretrained(tmp_path / "plain"), load_pretrained(tmp_path / "compact")
    for key, value in reference.state_dict().items():
        assert same_bits(loaded.state_dict()[key], value), key
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_compact_folder_is_smaller(folders, tmp_path):
    sizes = {}
    for name in ("dense", "half", "quant"):
        manifest = pack_folder(folders[name], tmp_path / name)
        entries = decoder_matrices(manifest)
        sizes[name] = sum(entry["bytes"] for entry in entries) / sum(
            torch.Size(entry["shape"]).numel() for entry in entries
        )
    assert sizes["dense"] == 4  # fp32, stored plain
    assert sizes["half"] == pytest.approx(2 * 0.5 + 1 / 8, abs=1e-3)  # bf16 values of half + 1 mask bit each
    assert sizes["quant"] < 0.5 * 4 / 8 + 1 / 8 + 3 / 16 + 1e-3  # 4-bit codes, mask, fp16 scale + zero per 16


def test_loaded_dtype_can_be_chosen(folders, tmp_path):
    pack_folder(folders["half"], tmp_path / "c")
    model = load_pretrained(tmp_path / "c", dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    reference = load_pretrained(folders["half"])
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.float()), key


def corrupt(folder, tmp_path, edit):
    import shutil

    target = tmp_path / "bad"
    shutil.copytree(folder, target)
    edit(target)
    return target


@pytest.fixture
def packed(folders, tmp_path):
    pack_folder(folders["quant"], tmp_path / "c")
    return tmp_path / "c"


def edit_manifest(change):
    def edit(folder):
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))

    return edit


def data_file(folder):
    return next(folder.glob("compact-*.safetensors"))


def test_truncated_file_is_refused(packed, tmp_path):
    def truncate(folder):
        path = data_file(folder)
        path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(SparseGPTError, match="truncated or malformed"):
        load_pretrained(corrupt(packed, tmp_path, truncate))


def test_flipped_byte_names_the_tensor(packed, tmp_path):
    manifest = json.loads((packed / MANIFEST).read_text())
    name = next(key for key, entry in manifest["tensors"].items() if entry["encoding"] == "bitmask")
    raw = data_file(packed).read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    offsets = json.loads(raw[8 : 8 + header_size])[f"{name}::codes"]["data_offsets"]

    def flip(folder):
        path = data_file(folder)
        data = bytearray(path.read_bytes())
        data[8 + header_size + offsets[0]] ^= 0xFF
        path.write_bytes(bytes(data))

    with pytest.raises(SparseGPTError, match=f"{name}: part {name}::codes is corrupted"):
        load_pretrained(corrupt(packed, tmp_path, flip))


def test_unknown_version_is_refused(packed, tmp_path):
    bad = corrupt(packed, tmp_path, edit_manifest(lambda manifest: manifest.update(version=99)))
    with pytest.raises(SparseGPTError, match="version 99 is not supported"):
        load_pretrained(bad)


def test_mask_that_disagrees_with_its_values_is_refused(packed, tmp_path):
    manifest = json.loads((packed / MANIFEST).read_text())
    name = next(key for key, entry in manifest["tensors"].items() if entry["encoding"] == "bitmask")

    def change(manifest):
        manifest["tensors"][name]["kept"] += 1

    with pytest.raises(SparseGPTError, match=f"{name}: the mask marks"):
        load_pretrained(corrupt(packed, tmp_path, edit_manifest(change)))


def test_shape_that_disagrees_is_refused(packed, tmp_path):
    manifest = json.loads((packed / MANIFEST).read_text())
    name = next(key for key, entry in manifest["tensors"].items() if entry["encoding"] == "bitmask")

    def change(manifest):
        manifest["tensors"][name]["shape"][0] *= 2

    with pytest.raises(SparseGPTError, match=name):
        load_pretrained(corrupt(packed, tmp_path, edit_manifest(change)))


def test_pack_refuses_bad_input(folders, tmp_path, packed):
    with pytest.raises(SparseGPTError, match="already a compact folder"):
        pack_folder(packed, tmp_path / "x")
    with pytest.raises(SparseGPTError, match="not a compact folder"):
        unpack_folder(folders["dense"], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_folders_may_be_given_as_strings(folders, tmp_path):
    pack_folder(str(folders["half"]), str(tmp_path / "c"))
    unpack_folder(str(tmp_path / "c"), str(tmp_path / "p"))
    assert same_bits(
        load_pretrained(str(tmp_path / "c")).lm_head.weight, load_pretrained(folders["half"]).lm_head.weight
    )
    assert (tmp_path / "p" / "model.safetensors").is_file()


def test_prune_result_saves_to_a_string_path(tmp_path):
    import sparsegpt

    result = sparsegpt.prune((tiny_model("llama"), tiny_tokenizer()), PruneConfig(method="magnitude"), None)
    result.save(str(tmp_path / "plain"))
    result.save(str(tmp_path / "compact"), compact_format=True)
    assert (tmp_path / "plain" / "config.json").is_file() and (tmp_path / "compact" / MANIFEST).is_file()
