// tus-js-client (the npm package, unmodified) uploading one file, driven by
// tests/test_interop_js.py.  One argument: a JSON object of options.
//
//   endpoint      the tus creation URL (absolute)
//   file          path of the file to send
//   chunkSize     bytes per PATCH (default: the whole file in one)
//   protocol      "tus-v1" (default), "ietf-draft-03" or "ietf-draft-05"
//   checksum      "sha256", "sha1" or "md5": an Upload-Checksum header on every
//                 PATCH, added by an onBeforeRequest hook (tus-js-client has no
//                 checksum option of its own); "corrupt" sends a wrong sha256
//   urlStorage    a JSON file remembering upload URLs (tus-js-client's own
//                 FileUrlStorage): a second run with the same file resumes
//   retryDelays   tus-js-client's retryDelays (default [0, 500, 1000, 2000])
//   parallelUploads  tus-js-client's parallelUploads: the file in that many
//                 partial uploads at once, joined by a final one (concatenation)
//   readme        path of the docs page (docs/resumable.md): run its tus-js-client snippet as written,
//                 with every retry delay set to 0 so only Retry-After spaces
//                 the attempts
//
// Prints one JSON object per line: {"event": "response", method, status, at,
// retryAfter}, {"event": "progress", sent, total} (whenever a new 10 % is
// passed), then {"event": "success", url} or {"event": "error", message}.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const tus = require("tus-js-client");

const options = JSON.parse(process.argv[2]);
const data = fs.readFileSync(options.file);

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({event: event}, fields)) + "\n");
}

function report(req, res) {
  emit("response", {method: req.getMethod(), status: res.getStatus(), at: Date.now() / 1000,
                    retryAfter: res.getHeader("Retry-After") || null,
                    offset: res.getHeader("Upload-Offset") || null,
                    location: res.getHeader("Location") || null});
}

let lastTenth = -1;
function progress(sent, total) {
  const tenth = Math.floor((10 * sent) / Math.max(total, 1));
  if (tenth !== lastTenth) {
    lastTenth = tenth;
    emit("progress", {sent: sent, total: total});
  }
}

/* Upload-Checksum for the chunk a PATCH carries: its offset is in the
 * request, its end follows from chunkSize. */
function addChecksum(req) {
  if (req.getMethod() !== "PATCH" || !options.checksum) return;
  const start = Number(req.getHeader("Upload-Offset"));
  const end = Math.min(data.length, start + (options.chunkSize || data.length));
  const algorithm = options.checksum === "corrupt" ? "sha256" : options.checksum;
  const hash = crypto.createHash(algorithm).update(data.subarray(start, end));
  if (options.checksum === "corrupt") hash.update("x");
  req.setHeader("Upload-Checksum", algorithm + " " + hash.digest("base64"));
}

function chain(first, second) {
  if (!first) return second;
  return async function () {
    await first.apply(this, arguments);
    return second.apply(this, arguments);
  };
}

if (options.readme) {
  // The docs page's block, unchanged, with `tus` and `file` in scope.  Its Upload
  // is observed through a subclass: absolute endpoint, every retry delay 0,
  // responses and the outcome reported.
  const readme = fs.readFileSync(options.readme, "utf8");
  const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
  const snippet = blocks.find((block) => block.includes("new tus.Upload("));
  if (!snippet) throw new Error("no tus-js-client snippet in " + options.readme);
  class ObservedUpload extends tus.Upload {
    constructor(file, opts) {
      super(file, Object.assign({}, opts, {
        endpoint: new URL(opts.endpoint, options.endpoint).href,
        retryDelays: opts.retryDelays.map(() => 0),
        onAfterResponse: chain(opts.onAfterResponse, report),
        onProgress: chain(opts.onProgress, progress),
        onSuccess: () => emit("success", {url: this.url}),
        onError: (error) => emit("error", {message: String(error)}),
      }));
    }
  }
  new Function("tus", "file", "console", snippet)(
    Object.assign({}, tus, {Upload: ObservedUpload}), data, {log() {}, error() {}});
} else {
  const extra = options.urlStorage ? {urlStorage: new tus.FileUrlStorage(options.urlStorage)} : {};
  const upload = new tus.Upload(data, Object.assign(extra, {
    endpoint: options.endpoint,
    chunkSize: options.chunkSize || Infinity,
    protocol: options.protocol || "tus-v1",
    retryDelays: options.retryDelays || [0, 500, 1000, 2000],
    parallelUploads: options.parallelUploads || 1,
    metadata: {filename: require("path").basename(options.file), filetype: "application/octet-stream"},
    storeFingerprintForResuming: Boolean(options.urlStorage),
    removeFingerprintOnSuccess: true,
    onBeforeRequest: addChecksum,
    onAfterResponse: report,
    onProgress: progress,
    onSuccess: () => emit("success", {url: upload.url}),
    onError: (error) => emit("error", {message: String(error)}),
  }));
  upload.findPreviousUploads().then((previous) => {
    if (previous.length) {
      emit("resuming", {url: previous[0].uploadUrl});
      upload.resumeFromPreviousUpload(previous[0]);
    }
    upload.start();
  });
}
