"""The proto contract the gateway serves: its files and services, in one place."""

from __future__ import annotations

from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from memgw.v1 import (
    access_pb2,
    auth_pb2,
    consume_pb2,
    deadletters_pb2,
    monitoring_pb2,
    produce_pb2,
    schemas_pb2,
    stations_pb2,
)

FILES: tuple[FileDescriptor, ...] = (
    auth_pb2.DESCRIPTOR,
    produce_pb2.DESCRIPTOR,
    consume_pb2.DESCRIPTOR,
    monitoring_pb2.DESCRIPTOR,
    access_pb2.DESCRIPTOR,
    stations_pb2.DESCRIPTOR,
    schemas_pb2.DESCRIPTOR,
    deadletters_pb2.DESCRIPTOR,
)

SERVICES: tuple[ServiceDescriptor, ...] = tuple(s for f in FILES for s in f.services_by_name.values())
