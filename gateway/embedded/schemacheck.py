"""Checks a Schemaverse schema definition before the control plane stores it.

Only the definition is checked here (is it a JSON Schema, a GraphQL SDL, an Avro schema?);
messages are validated by the producers (memphis-py does it client side, and so does the
gateway through memphis-py).

Protobuf definitions are compiled here, with grpcio-tools' protoc in a child process (its
errors come back as text, and a runaway compile is bounded in time), into what the Memphis
server used to hand the SDKs: a base64 ``FileDescriptorSet`` and the message to validate
against (docs/memphis-py.md, "schema_update"). memphis-py loads only the set's first file,
so a definition must be one self-contained file: imports are refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import tempfile
from pathlib import Path

from gateway.core.deadlines import timeout
from gateway.core.errors import InvalidArgument

SCHEMA_TYPES = ("json", "graphql", "protobuf", "avro")
MAX_DEFINITION_BYTES = 256 * 1024
PROTOC_TIMEOUT_S = 20.0
PROTO_FILE = "schema.proto"
_IMPORT = re.compile(r"^\s*import\s", re.MULTILINE)


def check_schema(schema_type: str, content: str) -> None:
    """Raise ``InvalidArgument`` unless ``content`` is a usable schema of ``schema_type``.

    Protobuf definitions are only checked for size and emptiness here: :func:`compile_proto` does the rest."""
    if schema_type not in SCHEMA_TYPES:
        raise InvalidArgument(f"schema type not supported, use one of: {', '.join(SCHEMA_TYPES)}")
    if not isinstance(content, str) or not content.strip():
        raise InvalidArgument("schema content can not be empty")
    if len(content.encode()) > MAX_DEFINITION_BYTES:
        raise InvalidArgument(f"schema definition too large: at most {MAX_DEFINITION_BYTES // 1024} KiB")
    try:
        if schema_type == "json":
            from jsonschema.validators import validator_for

            schema = json.loads(content)
            validator_for(schema).check_schema(schema)
        elif schema_type == "graphql":
            from graphql import build_schema

            build_schema(content)
        elif schema_type == "avro":
            import fastavro

            fastavro.parse_schema(json.loads(content))
    except InvalidArgument:
        raise
    except Exception as err:  # each library has its own error types
        raise InvalidArgument(f"invalid {schema_type} schema: {err}") from err


async def compile_proto(content: str, message_struct_name: str = "") -> tuple[str, str]:
    """(base64 FileDescriptorSet, message name) of a .proto definition; InvalidArgument naming what is wrong.

    The message is ``message_struct_name`` (a top-level message of the file), else the file's first."""
    check_schema("protobuf", content)
    if _IMPORT.search(content):
        raise InvalidArgument(
            "invalid protobuf schema: imports are not supported (the SDKs load one file): "
            "define every message the schema uses in this one file"
        )
    with tempfile.TemporaryDirectory(prefix="memgw-protoc-") as tmp:
        source, out = Path(tmp) / PROTO_FILE, Path(tmp) / "set.pb"
        source.write_text(content, encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"--descriptor_set_out={out}", PROTO_FILE,
            cwd=tmp, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with timeout(PROTOC_TIMEOUT_S):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise InvalidArgument(f"invalid protobuf schema: protoc did not finish within {PROTOC_TIMEOUT_S:g} s") \
                from None
        if proc.returncode != 0 or not out.exists():
            text = err.decode(errors="replace").strip().replace(f"{tmp}/", "")
            lines = [line for line in text.splitlines() if line.strip()][:5]
            raise InvalidArgument(f"invalid protobuf schema: {'; '.join(lines) or 'protoc failed'}")
        data = out.read_bytes()
    return base64.b64encode(data).decode(), _message_name(data, message_struct_name)


def _message_name(data: bytes, wanted: str) -> str:
    """The message to validate against, checked to load as memphis-py loads it."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    desc_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    file = desc_set.file[0]
    names = [m.name for m in file.message_type]
    if not names:
        raise InvalidArgument("invalid protobuf schema: the file defines no message")
    name = wanted or names[0]
    if name not in names:
        raise InvalidArgument(
            f"invalid protobuf schema: no top-level message {name!r} (message_struct_name); "
            f"the file defines: {', '.join(names)}"
        )
    pool = descriptor_pool.DescriptorPool()
    try:
        pool.Add(file)
        pool.FindMessageTypeByName(f"{file.package}.{name}" if file.package else name)
    except Exception as err:
        raise InvalidArgument(f"invalid protobuf schema: {err}") from err
    return name
