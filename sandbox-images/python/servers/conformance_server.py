"""The MCP conformance suite's fixture: the tools, resources and prompts its server scenarios
call (`npx @modelcontextprotocol/conformance list --server`), on the official SDK.

stdio by default (how Stockade runs it, in a sandbox); `--http PORT` serves it directly over
the SDK's own Streamable HTTP on 127.0.0.1, to compare the suite's results with and without
Stockade in between.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

from mcp import types
from mcp.server.mcpserver import Context, MCPServer

# A 1x1 red PNG, and a 44-byte silent WAV: the smallest valid media for the scenarios.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )
).decode()
WAV = base64.b64encode(
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x40\x1f\x00\x00"
    b"\x80\x3e\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00"
).decode()

server = MCPServer("stockade-conformance-fixture")


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _image() -> types.ImageContent:
    return types.ImageContent(type="image", data=PNG, mimeType="image/png")


@server.tool(description="Returns simple text")
def test_simple_text() -> list[Any]:
    return [_text("This is a simple text response for testing.")]


@server.tool(description="Returns an image")
def test_image_content() -> list[Any]:
    return [types.ImageContent(type="image", data=PNG, mimeType="image/png")]


@server.tool(description="Returns audio")
def test_audio_content() -> list[Any]:
    return [types.AudioContent(type="audio", data=WAV, mimeType="audio/wav")]


def _resource(uri: str, mime: str, text: str) -> types.EmbeddedResource:
    contents = types.TextResourceContents(uri=uri, mimeType=mime, text=text)
    return types.EmbeddedResource(type="resource", resource=contents)


@server.tool(description="Returns an embedded resource")
def test_embedded_resource() -> list[Any]:
    return [
        _resource("test://embedded-resource", "text/plain", "This is an embedded resource content.")
    ]


@server.tool(description="Returns text, an image and a resource")
def test_multiple_content_types() -> list[Any]:
    return [
        _text("Multiple content types test:"),
        types.ImageContent(type="image", data=PNG, mimeType="image/png"),
        _resource(
            "test://mixed-content-resource",
            "application/json",
            json.dumps({"test": "data", "value": 123}),
        ),
    ]


@server.tool(description="Logs three messages while it runs")
async def test_tool_with_logging(ctx: Context) -> str:
    await ctx.info("Tool execution started")
    await asyncio.sleep(0.05)
    await ctx.info("Tool processing data")
    await asyncio.sleep(0.05)
    await ctx.info("Tool execution completed")
    return "Tool with logging executed successfully"


@server.tool(description="Always fails")
def test_error_handling() -> str:
    raise RuntimeError("This tool intentionally returns an error for testing")


@server.tool(description="Reports progress 0, 50, 100 of 100")
async def test_tool_with_progress(ctx: Context) -> str:
    for step in (0, 50, 100):
        await ctx.report_progress(step, 100)
        if step < 100:
            await asyncio.sleep(0.05)
    return "Tool with progress executed successfully"


@server.tool(description="Asks the client's LLM")
async def test_sampling(prompt: str, ctx: Context) -> str:
    message = types.SamplingMessage(role="user", content=_text(prompt))
    answer = await ctx.session.create_message([message], max_tokens=100)
    content = answer.content
    text = content.text if isinstance(content, types.TextContent) else str(content)
    return f"LLM response: {text}"


async def _elicit(ctx: Context, message: str, schema: dict[str, Any]) -> types.ElicitResult:
    return await ctx.session.elicit(message, schema)


@server.tool(description="Asks the user for a name and an email")
async def test_elicitation(message: str, ctx: Context) -> str:
    schema = {
        "type": "object",
        "properties": {
            "username": {"type": "string", "description": "User's response"},
            "email": {"type": "string", "description": "User's email address"},
        },
        "required": ["username", "email"],
    }
    result = await _elicit(ctx, message, schema)
    return f"User response: action={result.action}, content={json.dumps(result.content)}"


@server.tool(description="Elicitation with defaults for every primitive type")
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "default": "John Doe"},
            "age": {"type": "integer", "default": 30},
            "score": {"type": "number", "default": 95.5},
            "status": {
                "type": "string",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": {"type": "boolean", "default": True},
        },
    }
    result = await _elicit(ctx, "Please review and update the form fields with defaults", schema)
    return f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"


@server.tool(description="Elicitation with every kind of enum")
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    titled = [
        {"const": "value1", "title": "First Option"},
        {"const": "value2", "title": "Second Option"},
        {"const": "value3", "title": "Third Option"},
    ]
    choices = [
        {"const": "value1", "title": "First Choice"},
        {"const": "value2", "title": "Second Choice"},
        {"const": "value3", "title": "Third Choice"},
    ]
    schema = {
        "type": "object",
        "properties": {
            "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
            "titledSingle": {"type": "string", "oneOf": titled},
            "legacyEnum": {
                "type": "string",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {
                "type": "array",
                "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
            },
            "titledMulti": {"type": "array", "items": {"anyOf": choices}},
        },
    }
    result = await _elicit(ctx, "Please select options from the enum fields", schema)
    return f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"


@server.resource(
    "test://static-text", name="static-text", description="Static text", mime_type="text/plain"
)
def static_text() -> str:
    return "This is the content of the static text resource."


@server.resource(
    "test://static-binary", name="static-binary", description="A PNG", mime_type="image/png"
)
def static_binary() -> bytes:
    return base64.b64decode(PNG)


@server.resource(
    "test://watched-resource",
    name="watched-resource",
    description="A resource to subscribe to",
    mime_type="text/plain",
)
def watched_resource() -> str:
    return "Watched resource content."


@server.resource(
    "test://template/{id}/data",
    name="template-data",
    description="Data by id",
    mime_type="application/json",
)
def template_data(id: str) -> str:
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@server.prompt(description="A simple prompt")
def test_simple_prompt() -> list[Any]:
    return [{"role": "user", "content": _text("This is a simple prompt for testing.")}]


@server.prompt(description="A prompt with two arguments")
def test_prompt_with_arguments(arg1: str, arg2: str) -> list[Any]:
    text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
    return [{"role": "user", "content": _text(text)}]


@server.prompt(description="A prompt embedding a resource")
def test_prompt_with_embedded_resource(resourceUri: str) -> list[Any]:
    embedded = _resource(resourceUri, "text/plain", "Embedded resource content for testing.")
    return [
        {"role": "user", "content": embedded},
        {"role": "user", "content": _text("Please process the embedded resource above.")},
    ]


@server.prompt(description="A prompt with an image")
def test_prompt_with_image() -> list[Any]:
    return [
        {
            "role": "user",
            "content": types.ImageContent(type="image", data=PNG, mimeType="image/png"),
        },
        {"role": "user", "content": _text("Please analyze the image above.")},
    ]


@server.completion()
async def complete(ref: Any, argument: Any, context: Any) -> types.Completion:
    words = ["paris", "park", "party"]
    prefix = getattr(argument, "value", "") or ""
    return types.Completion(values=[w for w in words if w.startswith(prefix)], hasMore=False)


# Methods MCPServer has no decorator for: logging level, and resource subscriptions (the
# scenarios only need them accepted; this fixture never changes a resource).
SUBSCRIBED: set[str] = set()


async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
    return types.EmptyResult()


async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
    SUBSCRIBED.add(str(params.uri))
    return types.EmptyResult()


async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    SUBSCRIBED.discard(str(params.uri))
    return types.EmptyResult()


LOWLEVEL = server._lowlevel_server
LOWLEVEL.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
LOWLEVEL.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
LOWLEVEL.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)


if __name__ == "__main__":
    if "--http" in sys.argv:
        port = int(sys.argv[sys.argv.index("--http") + 1])
        server.run(transport="streamable-http", host="127.0.0.1", port=port)
    else:
        server.run()
