// @tus/server with @tus/s3-store (the npm packages, unmodified): the Node reference that
// bench/bench_resumable_s3.py measures uploadguard's S3 store against, on the same SeaweedFS.
//
//   node tus_s3_server.mjs PORT BUCKET    serves http://127.0.0.1:PORT/files/
//
// Endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
// Parts of 8 MiB (the store's default, and uploadguard's); prints "listening" once it accepts connections.
import http from "node:http";
import {Server} from "@tus/server";
import {S3Store} from "@tus/s3-store";

const [port, bucket] = process.argv.slice(2);
const datastore = new S3Store({
  partSize: 8 * 1024 * 1024,
  s3ClientConfig: {
    bucket,
    region: process.env.AWS_DEFAULT_REGION || "us-east-1",
    endpoint: process.env.AWS_ENDPOINT_URL,
    forcePathStyle: true,
    credentials: {accessKeyId: process.env.AWS_ACCESS_KEY_ID, secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY},
  },
});
const tus = new Server({path: "/files", datastore});
const server = http.createServer((req, res) => tus.handle(req, res));
server.requestTimeout = 0;
server.listen(Number(port), "127.0.0.1", () => process.stdout.write("listening\n"));
