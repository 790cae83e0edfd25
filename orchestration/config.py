"""Settings: every option has a default; `FANOUT_*` environment variables override them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestration.errors import ConfigError
from toolbus.limits import CommandLimits
from toolbus.permissions import PermissionRules

DEFAULT_MODEL = "claude-sonnet-5-5"

_LIST_FIELDS = frozenset({"env_passthrough", "include", "sandbox_ro_paths"})
_LIMITS = CommandLimits()

SandboxSetting = Literal["auto", "bwrap", "none"]
# The Anthropic SDK's HTTP transport: aiohttp (the SDK's `aiohttp` extra; its C parser costs a
# request less CPU, which counts with many agents on one event loop) or httpx (the SDK's own).
HttpClientSetting = Literal["aiohttp", "httpx"]
DEFAULT_HTTP_CLIENT: HttpClientSetting = "aiohttp"
# The prompt-cache lifetime of a run's shared prefix: chosen per run, or always one of the API's.
CacheTtlSetting = Literal["auto", "5m", "1h"]


class Settings(BaseModel):
    """The server's options (see the README's configuration table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: Path | None = Field(default=None, description="FANOUT_REPO: the repository to work on")
    model: str = Field(default=DEFAULT_MODEL, description="FANOUT_MODEL: default model")
    max_concurrency: int = Field(default=8, ge=1, le=64, description="FANOUT_MAX_CONCURRENCY")
    max_turns: int = Field(default=40, ge=1, le=500, description="FANOUT_MAX_TURNS")
    budget_tokens: int = Field(default=2_000_000, ge=1_000, description="FANOUT_BUDGET_TOKENS")
    max_running: int = Field(
        default=64,
        ge=1,
        le=1_024,
        description="FANOUT_MAX_RUNNING: agents running at once, all runs",
    )
    server_budget_tokens: int | None = Field(
        default=None, ge=1_000, description="FANOUT_SERVER_BUDGET_TOKENS: tokens across all runs"
    )
    max_output_tokens: int = Field(default=8_192, ge=256, description="FANOUT_MAX_OUTPUT_TOKENS")
    sandbox: SandboxSetting = Field(default="auto", description="FANOUT_SANDBOX")
    allow_network: bool = Field(default=False, description="FANOUT_ALLOW_NETWORK")
    env_passthrough: tuple[str, ...] = Field(default=(), description="FANOUT_ENV_PASSTHROUGH")
    include: tuple[str, ...] = Field(default=(), description="FANOUT_INCLUDE")
    # read from the environment at start-up, before the settings (workspace.overlay); here so
    # that a wrong value is an error, not silently the default
    workspaces: Literal["auto", "worktree", "fuse-overlayfs"] = Field(
        default="auto", description="FANOUT_WORKSPACES"
    )
    command_timeout_s: float = Field(default=120.0, gt=0, description="FANOUT_COMMAND_TIMEOUT_S")
    # per command, 0 for no limit (see toolbus.limits for the defaults' reasons)
    command_max_processes: int = Field(
        default=_LIMITS.max_processes, ge=0, description="FANOUT_COMMAND_MAX_PROCESSES"
    )
    command_max_memory_mb: int = Field(
        default=_LIMITS.max_memory_mb, ge=0, description="FANOUT_COMMAND_MAX_MEMORY_MB"
    )
    command_tmp_mb: int = Field(default=_LIMITS.tmp_mb, ge=0, description="FANOUT_COMMAND_TMP_MB")
    sandbox_ro_paths: tuple[Path, ...] = Field(
        default=(), description="FANOUT_SANDBOX_RO_PATHS: more read-only paths commands see"
    )
    lease_ttl_s: float = Field(default=30.0, gt=0, description="FANOUT_LEASE_TTL_S")
    lease_lock_delay_s: float = Field(default=5.0, ge=0, description="FANOUT_LEASE_LOCK_DELAY_S")
    model_timeout_s: float = Field(default=600.0, gt=0, description="FANOUT_MODEL_TIMEOUT_S")
    http_client: HttpClientSetting = Field(
        default=DEFAULT_HTTP_CLIENT, description="FANOUT_HTTP_CLIENT"
    )
    retry_max_attempts: int = Field(default=6, ge=1, description="FANOUT_RETRY_MAX_ATTEMPTS")
    retry_after_cap_s: float = Field(default=30.0, ge=0, description="FANOUT_RETRY_AFTER_CAP_S")
    rate_limit_wait_s: float = Field(
        default=900.0, ge=0, description="FANOUT_RATE_LIMIT_WAIT_S: a call's wait on the rate limit"
    )
    delete_merged_branches: bool = Field(default=False, description="FANOUT_DELETE_MERGED_BRANCHES")
    status_wait_cap_s: float = Field(default=600.0, gt=0, description="FANOUT_STATUS_WAIT_CAP_S")
    cache_ttl: CacheTtlSetting = Field(
        default="auto", description="FANOUT_CACHE_TTL: the shared prefix's cache lifetime"
    )
    cache_min_tokens: int | None = Field(
        default=None, ge=0, description="FANOUT_CACHE_MIN_TOKENS: the model's minimum cacheable"
    )
    cache_warmup_max_s: float = Field(
        default=30.0, ge=0, description="FANOUT_CACHE_WARMUP_MAX_S: 0 starts agents together"
    )
    permissions: PermissionRules = Field(
        default_factory=PermissionRules,
        description="FANOUT_PERMISSIONS: the permission policy, as JSON or @<file of JSON>",
    )
    approval_timeout_s: float = Field(
        default=300.0, gt=0, description="FANOUT_APPROVAL_TIMEOUT_S: no answer by then refuses"
    )
    executor: Literal["in-process", "ray"] = Field(
        default="in-process", description="FANOUT_EXECUTOR: where agents run"
    )
    ray_address: str | None = Field(
        default=None,
        description="FANOUT_RAY_ADDRESS: the Ray cluster (host:port of its head; 'local' or "
        "unset: a local cluster started on demand)",
    )
    ray_cpus_per_agent: float = Field(
        default=1.0,
        gt=0,
        description="FANOUT_RAY_CPUS_PER_AGENT: the CPUs each agent's actor declares",
    )
    mcp_config: Path | None = Field(
        default=None,
        description="FANOUT_MCP_CONFIG: a JSON file of downstream MCP servers ({mcpServers: …})",
    )

    @field_validator("permissions", mode="before")
    @classmethod
    def _permissions(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("@"):
            try:
                text = Path(text[1:]).expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read the permissions file: {exc}") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(
                f'not JSON ({exc}); give {{"allow": [...], "ask": [...], '
                '"deny": [...], "default": ...}} or @<file>'
            ) from None

    @field_validator("sandbox_ro_paths")
    @classmethod
    def _absolute(cls, paths: tuple[Path, ...]) -> tuple[Path, ...]:
        expanded = tuple(p.expanduser() for p in paths)
        relative = [str(p) for p in expanded if not p.is_absolute()]
        if relative:
            raise ValueError(f"paths must be absolute: {', '.join(relative)}")
        return expanded

    @property
    def command_limits(self) -> CommandLimits:
        """The limits of each command of a subagent."""
        return CommandLimits(
            max_processes=self.command_max_processes,
            max_memory_mb=self.command_max_memory_mb,
            tmp_mb=self.command_tmp_mb,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `FANOUT_*` variables, then explicit overrides (command-line flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"FANOUT_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name in _LIST_FIELDS:
                values[name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            elif field.annotation is bool:
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"FANOUT_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid configuration: {problems}") from None
