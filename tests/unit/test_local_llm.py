"""scripts/local_llm.py without a server: the command line it builds, the GGUF header reader, and its errors."""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from scripts import local_llm
from scripts.local_llm import LocalLLMError, gguf_architecture, server_command


def _gguf(path, kvs: list[tuple[str, int, bytes]]) -> None:
    """A GGUF v3 header holding the given (key, value type, encoded value) pairs and no tensors."""
    out = b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, len(kvs))
    for key, vtype, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value
    path.write_bytes(out)


def _str(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_gguf_architecture_found_after_other_keys(tmp_path):
    f = tmp_path / "m.gguf"
    tokens = struct.pack("<IQ", 8, 2) + _str("<s>") + _str("hello")  # an array of strings
    _gguf(f, [("general.alignment", 4, struct.pack("<I", 32)), ("tokenizer.tokens", 9, tokens),
              ("general.architecture", 8, _str("qwen3"))])
    assert gguf_architecture(f) == "qwen3"


def test_gguf_architecture_rejects_other_files(tmp_path):
    f = tmp_path / "not.gguf"
    f.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(LocalLLMError, match="not a GGUF file"):
        gguf_architecture(f)
    f.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00")
    with pytest.raises(LocalLLMError, match="truncated"):
        gguf_architecture(f)


def test_server_command_sets_embedding_pooling_and_loopback(tmp_path):
    f = tmp_path / "m.gguf"
    _gguf(f, [("general.architecture", 8, _str("llama"))])
    cmd = server_command(f, port=0, n_ctx=4096, threads=2)
    line = " ".join(cmd)
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    assert "--host 127.0.0.1 --port 0 --n_ctx 4096" in line
    assert "--n_threads 2 --n_threads_batch 2 --n_batch 512 --n_ubatch 512" in line
    assert "--embedding true --kv_overrides llama.pooling_type=int:1" in line
    chat_only = " ".join(server_command(f, embedding=False))
    assert "--embedding" not in chat_only and "pooling_type" not in chat_only
    with pytest.raises(ValueError):
        server_command(f, pooling="max")


def test_missing_install_is_one_line_and_exit_2(monkeypatch, tmp_path, repo_root):
    monkeypatch.setattr(local_llm, "llama_cpp_installed", lambda: False)
    with pytest.raises(LocalLLMError, match="setup_local_llm.sh"):
        local_llm.LocalLLMServer(model=tmp_path / "m.gguf")
    proc = subprocess.run([sys.executable, "-m", "scripts.local_llm", "--model", str(tmp_path / "absent.gguf")],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"local_llm: --model {tmp_path / 'absent.gguf'}: no such file"]


def test_server_environment_makes_openmp_wait_passively_unless_the_user_chose(monkeypatch, tmp_path):
    monkeypatch.setattr(local_llm, "llama_cpp_installed", lambda: True)
    f = tmp_path / "m.gguf"
    _gguf(f, [("general.architecture", 8, _str("llama"))])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert local_llm.LocalLLMServer(model=f).environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert local_llm.LocalLLMServer(model=f).environment()["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("flag,value", [("--n-ctx", "10"), ("--threads", "0"), ("--n-batch", "0"), ("--port", "-1")])
def test_bad_numbers_are_one_line_and_exit_2(flag, value, repo_root):
    proc = subprocess.run([sys.executable, "-m", "scripts.local_llm", flag, value, "--print-model"], cwd=repo_root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and flag in proc.stderr
