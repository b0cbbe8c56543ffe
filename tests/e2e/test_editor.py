"""An editor checks the gateway's configs against the shipped schema, as a user's editor would.

The YAML language server (Red Hat's yaml-language-server, pinned in tests/e2e/editor: what VS
Code's YAML extension, Neovim and JetBrains run) is started as a real process and spoken to over
the Language Server Protocol.  It finds the schema only through the file's own
``# yaml-language-server: $schema=...`` line, so this proves that line, the shipped schema file and
the declarations together: shipped configs get no complaint, a misspelt key and a wrongly typed
value are flagged on their lines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.e2e.node import installed

if shutil.which("node") is None:
    pytest.skip("node is not on PATH: the YAML language server is Node.js", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
EDITOR_DIR = Path(__file__).parent / "editor"
ANSWER_TIMEOUT_S = 20.0
SHIPPED = [
    ROOT / "config" / "gateway.example.yaml",
    ROOT / "config" / "gateway.minimal.yaml",
    ROOT / "config" / "demo.yaml",
    ROOT / "deploy" / "forward-auth" / "gateway.yaml",
    ROOT / "deploy" / "k8s" / "gateway.yaml",
]


class LanguageServer:
    """yaml-language-server --stdio, with a reader thread so every wait is bounded."""

    def __init__(self, folder: Path) -> None:
        binary = folder / "node_modules" / ".bin" / "yaml-language-server"
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(binary), "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._messages: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        self._next_id = 0
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        try:
            self._read_messages(stream)
        except (OSError, ValueError):  # the stream closed under us: the server is gone
            return

    def _read_messages(self, stream: IO[bytes]) -> None:
        while True:
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if not length:
                return
            message = json.loads(stream.read(length))
            with self._arrived:
                self._messages.append(message)
                self._arrived.notify_all()

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.process.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        self.send({"id": ident, "method": method, "params": params})
        return self.wait(lambda m: m.get("id") == ident and "method" not in m)

    def wait(self, wanted: Any) -> dict[str, Any]:
        """The first message ``wanted`` accepts, answering the server's configuration requests."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        with self._arrived:
            while True:
                for message in self._messages:
                    if message.get("method") == "workspace/configuration":
                        self._messages.remove(message)
                        items = message["params"]["items"]
                        self.send({"id": message["id"], "result": [SETTINGS for _ in items]})
                        break
                    if wanted(message):
                        self._messages.remove(message)
                        return message
                else:
                    left = deadline - time.monotonic()
                    assert left > 0, "the language server did not answer in time"
                    self._arrived.wait(left)

    def diagnostics(self, path: Path, text: str) -> list[tuple[int, str]]:
        """Open ``text`` as the file at ``path``: the (line, message) pairs the editor shows."""
        uri = path.as_uri()
        self.send({"method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "yaml", "version": 1, "text": text,
        }}})  # fmt: skip
        published = self.wait(
            lambda m: (
                m.get("method") == "textDocument/publishDiagnostics" and m["params"]["uri"] == uri
            )
        )
        self.send({"method": "textDocument/didClose", "params": {"textDocument": {"uri": uri}}})
        return [
            (d["range"]["start"]["line"] + 1, d["message"])
            for d in published["params"]["diagnostics"]
        ]

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


# Validation on; no schema from the network (schemastore): only the file's own $schema line.
SETTINGS: dict[str, Any] = {"validate": True, "schemaStore": {"enable": False}}


@pytest.fixture(scope="module")
def editor() -> Any:
    server = LanguageServer(installed(EDITOR_DIR, "yaml-language-server"))
    try:
        server.request("initialize", {
            "processId": None, "rootUri": ROOT.as_uri(),
            "capabilities": {"workspace": {"configuration": True}},
        })  # fmt: skip
        server.send({"method": "initialized", "params": {}})
        server.send({"method": "workspace/didChangeConfiguration", "params": {"settings": {"yaml": SETTINGS}}})  # fmt: skip
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_config_gets_no_complaint(editor: LanguageServer, path: Path) -> None:
    assert editor.diagnostics(path, path.read_text(encoding="utf-8")) == []


def test_a_misspelt_key_and_a_wrong_type_are_flagged_on_their_lines(
    editor: LanguageServer, tmp_path: Path
) -> None:
    example = ROOT / "config" / "gateway.example.yaml"
    lines = example.read_text(encoding="utf-8").splitlines()
    misspelt = next(i for i, line in enumerate(lines) if line.startswith("  max_body_bytes:"))
    retyped = next(i for i, line in enumerate(lines) if line.startswith("  max_headers:"))
    lines[misspelt] = "  max_body_byte: 1048576"
    lines[retyped] = "  max_headers: many"
    # Beside the example, so the $schema line (relative) finds the same schema file.
    edited = example.with_name(f".editor-probe-{tmp_path.name}.yaml")
    try:
        shown = editor.diagnostics(edited, "\n".join(lines) + "\n")
    finally:
        edited.unlink(missing_ok=True)
    assert sorted(shown) == [
        (retyped + 1, 'Incorrect type. Expected "integer".'),
        (misspelt + 1, "Property max_body_byte is not allowed."),
    ]


def test_without_the_schema_line_nothing_is_checked(editor: LanguageServer) -> None:
    # The control: the flags above come from the file's $schema line, nothing else.
    example = ROOT / "config" / "gateway.example.yaml"
    text = example.read_text(encoding="utf-8").split("\n", 1)[1]
    text = text.replace("  max_headers: 100", "  max_headers: many")
    assert editor.diagnostics(example.with_name("no-schema-line.yaml"), text) == []
