"""Between protobuf messages and the daemon's own models (proto3 zero values mean unset)."""

from __future__ import annotations

from stockade.registry import ServerDefinition, ServerSource, TrialReport, parse_definition
from stockade.supervisor.state import ServerState
from stockade.v1 import control_pb2


def definition_from_proto(message: control_pb2.ServerDefinition) -> ServerDefinition:
    """Validate a definition from the API; raises RegistryError naming the bad field."""
    sandbox: dict[str, object] = {}
    if message.HasField("sandbox"):
        box = message.sandbox
        if box.runtime:
            sandbox["runtime"] = box.runtime
        if box.network:
            sandbox["network"] = box.network
        if box.memory_bytes:
            sandbox["memory_bytes"] = box.memory_bytes
        if box.cpus:
            sandbox["cpus"] = box.cpus
        if box.pids_limit:
            sandbox["pids_limit"] = box.pids_limit
    data: dict[str, object] = {
        "name": message.name,
        "image": message.image,
        "command": tuple(message.command),
        "args": tuple(message.args),
        "working_dir": message.working_dir or None,
        "sandbox": sandbox,
        "shared": message.shared,
        "warm_pool": message.warm_pool,
        "restart_policy": message.restart_policy or "on-failure",
        "image_id": message.image_id or None,
        "env": dict(message.env),
        "secret_env": dict(message.secret_env),
        "transport": message.transport or "stdio",
        "port": message.port or None,
        "path": message.path or "/mcp",
    }
    if message.HasField("source"):
        src = message.source
        data["source"] = {
            "kind": src.kind or "image",
            **{
                key: getattr(src, key) or None
                for key in (
                    "package",
                    "version",
                    "digest",
                    "lock_hash",
                    "recipe_hash",
                    "index",
                    "image_user",
                )
            },
            "system_packages": tuple(src.system_packages),
        }
    return parse_definition(data)


def source_to_proto(source: ServerSource) -> control_pb2.ServerSource:
    fields = source.model_dump(exclude={"system_packages"})
    return control_pb2.ServerSource(
        **{key: value or "" for key, value in fields.items()},
        system_packages=list(source.system_packages),
    )


def trial_to_proto(report: TrialReport) -> control_pb2.TrialReport:
    return control_pb2.TrialReport(**report.model_dump())


def definition_to_proto(definition: ServerDefinition) -> control_pb2.ServerDefinition:
    box = definition.sandbox
    return control_pb2.ServerDefinition(
        name=definition.name,
        image=definition.image,
        command=list(definition.command),
        args=list(definition.args),
        working_dir=definition.working_dir or "",
        sandbox=control_pb2.SandboxSettings(
            runtime=box.runtime,
            network=box.network,
            memory_bytes=box.memory_bytes or 0,
            cpus=box.cpus or 0.0,
            pids_limit=box.pids_limit or 0,
        ),
        shared=definition.shared,
        warm_pool=definition.warm_pool,
        restart_policy=definition.restart_policy,
        image_id=definition.image_id or "",
        env=dict(definition.env),
        secret_env=dict(definition.secret_env),
        transport=definition.transport,
        port=definition.port or 0,
        path=definition.path,
        source=source_to_proto(definition.source) if definition.source else None,
        checked=trial_to_proto(definition.checked) if definition.checked else None,
    )


def server_status_to_proto(state: ServerState) -> control_pb2.ServerStatus:
    return control_pb2.ServerStatus(
        name=state.definition.name,
        instances=len(state.in_use),
        pooled=len(state.pool),
        restarts=state.restarts,
        warm_pool=state.definition.warm_pool,
        recent_exits=[
            control_pb2.ExitRecord(
                instance=instance_id,
                exit_code=report.exit_code,
                oom_killed=report.oom_killed,
                pids_limit_hits=report.pids_limit_hits,
                stopped_by_daemon=report.stopped_by_daemon,
                at=at,
            )
            for at, instance_id, report in state.exits
        ],
        last_error=state.last_error,
        failures=state.failures,
        next_retry_at=state.next_retry_at,
    )
