"""The Control servicer: what operators ask the daemon.

RPCs whose feature has not landed yet answer UNIMPLEMENTED with a one-line reason; nothing
is allowed by accident.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import grpc

from stockade import __version__
from stockade.v1 import control_pb2, control_pb2_grpc


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, listeners: list[str]) -> None:
        self._started = time.monotonic()
        self._listeners = listeners

    async def GetStatus(
        self,
        request: control_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[control_pb2.GetStatusRequest, control_pb2.Status],
    ) -> control_pb2.Status:
        return control_pb2.Status(
            version=__version__,
            uptime_seconds=time.monotonic() - self._started,
            listeners=self._listeners,
        )

    async def _not_yet(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the server registry is not in this version yet"
        )

    async def AddServer(
        self, request: control_pb2.AddServerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.ServerDefinition:
        await self._not_yet(context)

    async def ListServers(
        self, request: control_pb2.ListServersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.ListServersResponse:
        await self._not_yet(context)

    async def GetServer(
        self, request: control_pb2.GetServerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.ServerDefinition:
        await self._not_yet(context)

    async def RemoveServer(
        self, request: control_pb2.RemoveServerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.RemoveServerResponse:
        await self._not_yet(context)

    async def ListSessions(
        self, request: control_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.ListSessionsResponse:
        await self._not_yet(context)
