"""A webhook receiver that checks every delivery with the Standard Webhooks
reference library (the `standardwebhooks` package), so that linkid's
signatures are judged by another implementation than its own.
tests/api/webhook_engine.rs starts it.

    python3 webhook_receiver.py SECRET OUT

It listens on 127.0.0.1 (a free port, printed alone on the first line of
stdout) and, for each POST, verifies it with SECRET (`whsec_...`): when it
verifies, it answers 204 and appends to OUT one JSON line
`{"id", "verified": true, "body": <the body, base64>}`; when not, it
answers 400 and appends `{"id", "verified": false, "error"}`.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> None:
    secret, out = sys.argv[1], sys.argv[2]
    webhook = Webhook(secret)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            record = {"id": self.headers.get("webhook-id")}
            try:
                webhook.verify(body, dict(self.headers.items()))
                record.update(verified=True, body=base64.b64encode(body).decode())
                status = 204
            except WebhookVerificationError as error:
                record.update(verified=False, error=str(error))
                status = 400
            with lock, open(out, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
