// @tus/server with @tus/file-store (the npm packages, unmodified): the Node
// reference server that bench/bench_resumable.py measures uploadguard against.
//
//   node tus_server.js PORT DIRECTORY    serves http://127.0.0.1:PORT/files/
//
// Prints "listening" once it accepts connections.
"use strict";

const http = require("http");
const {Server} = require("@tus/server");
const {FileStore} = require("@tus/file-store");

const [port, directory] = process.argv.slice(2);
const tus = new Server({path: "/files", datastore: new FileStore({directory: directory})});
const server = http.createServer((req, res) => tus.handle(req, res));
server.requestTimeout = 0;  // Node's 300 s default would cut a slow 200 MiB PATCH
server.listen(Number(port), "127.0.0.1", () => process.stdout.write("listening\n"));
