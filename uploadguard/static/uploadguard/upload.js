/*
 * uploadguard/upload.js: upload files one per request, with progress, and
 * retry when the server says "not now" so nobody has to reload the page.
 *
 * Browsers never retry a POST by themselves.  This helper does, for the two
 * cases where sending the same request again is right:
 *
 *   503           the server could not take the upload right now; it waits
 *                 for the Retry-After header (whole seconds, or an HTTP date
 *                 such as "Sun, 06 Nov 1994 08:49:37 GMT"; a backoff if the
 *                 header is missing or anything else), capped by maxDelay
 *   status 0      a network error (connection reset or refused, timeout):
 *                 retried after 1, 2, 4, 8... seconds, capped by maxDelay
 *
 * Anything else is final: a 2xx resolves, every other status (413 included)
 * rejects with an UploadError whose message is the server's own ("detail" of
 * a JSON body, else the text).  One file per request, so each file has its
 * own progress and a retry sends only that file again.  No dependencies.
 *
 * API:
 *
 *   UploadGuard.upload(url, file, {
 *     fieldName: "file",        // form field of the file
 *     fields: {quality: "85"},  // other form fields
 *     csrfToken: token,         // sent as X-CSRFToken (Django's header)
 *     headers: {},              // more request headers
 *     maxAttempts: 5,           // attempts in all, the first one included (a whole number >= 1)
 *     maxDelay: 60,             // seconds waited at most between attempts (at most 300)
 *     onProgress: function (loaded, total) {},
 *     onStatus: function (text, info) {}  // info: {state, attempt, maxAttempts, delay, status}
 *   }) -> Promise resolving to {status, data, attempts, xhr}
 *
 *   info.state is "uploading", "retrying", "stored" or "failed".  The
 *   promise rejects with an UploadGuard.UploadError (.status, .data,
 *   .attempts), or at once with a RangeError, sending nothing, when
 *   maxAttempts is given but is not a whole number of at least 1 (0 would
 *   otherwise silently mean 5, "3" or 2.5 something unintended).  Cross-origin uploads need the server to send
 *   "Access-Control-Expose-Headers: Retry-After".
 *
 * Auto-binding: a form marked <form data-uploadguard> uploads each chosen
 * file on submit, with the form's other fields (Django's csrfmiddlewaretoken
 * included), shows one <li> per file (name, <progress>, status text) in the
 * form's [data-uploadguard-list] element, and dispatches bubbling
 * "uploadguard:stored" / "uploadguard:failed" events whose detail is
 * {file, item, result} / {file, item, error}.  Each <li> has a data-state
 * ("queued", then as info.state) to style it by.  data-uploadguard-concurrency
 * sets how many files are sent at once (a positive whole number; default 2).
 * With data-uploadguard-resumable="/files/" each file goes to that tus
 * endpoint through resumableUpload instead (see below) and the "stored"
 * event's detail.result is {url, size, requests}: submit the url to the app.
 */
(function (root) {
  "use strict";

  var DEFAULT_MAX_DELAY = 60;  // seconds
  var MAX_DELAY = 300;  // seconds: no option or header makes a retry wait longer
  var DEFAULT_CONCURRENCY = 2;  // files sent at once by a bound form
  var HTTP_DATE = /^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$/;

  function UploadError(message, status, data, attempts) {
    var error = new Error(message);
    error.name = "UploadError";
    error.status = status;
    error.data = data;
    error.attempts = attempts;
    Object.setPrototypeOf(error, UploadError.prototype);
    return error;
  }
  UploadError.prototype = Object.create(Error.prototype);
  UploadError.prototype.constructor = UploadError;

  function parseBody(xhr) {
    var type = xhr.getResponseHeader("Content-Type") || "";
    if (type.indexOf("json") !== -1) {
      try {
        return JSON.parse(xhr.responseText);
      } catch (ignored) {
        // fall through: keep the text
      }
    }
    return xhr.responseText;
  }

  function messageOf(status, data) {
    if (data && typeof data === "object" && data.detail) return String(data.detail);
    if (typeof data === "string" && data.trim()) {
      var text = data.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
      if (text) return text.slice(0, 300);
    }
    return status ? "The server answered " + status + "." : "The server could not be reached.";
  }

  /* ``value`` as a whole number of at least ``least``, else ``fallback``. */
  function wholeNumber(value, least, fallback) {
    var text = String(value === undefined || value === null ? "" : value).trim();
    var number = /^\d+$/.test(text) ? parseInt(text, 10) : NaN;
    return number >= least ? number : fallback;
  }

  /* Seconds a Retry-After header asks for, or null when absent or unreadable:
   * whole seconds, or an IMF-fixdate (RFC 9110).  Date.parse alone would take
   * "1.5", "+5", "-1" or "5, 5" for dates in the past, i.e. "now". */
  function retryAfterSeconds(value) {
    var text = (value || "").trim();
    if (/^\d+$/.test(text)) return parseInt(text, 10);
    if (!HTTP_DATE.test(text)) return null;
    var when = Date.parse(text);
    return isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
  }

  /* Seconds to wait before attempt ``attempt`` + 1: the Retry-After header
   * (null for none), else a backoff of 1, 2, 4... seconds; capped by
   * ``maxDelay`` and MAX_DELAY. */
  function retryDelay(header, attempt, maxDelay) {
    var wait = retryAfterSeconds(header);
    if (wait === null) wait = Math.pow(2, Math.max(0, attempt - 1));
    var cap = typeof maxDelay === "number" && maxDelay >= 0 ? Math.min(maxDelay, MAX_DELAY) : DEFAULT_MAX_DELAY;
    return Math.min(wait, cap);
  }

  function upload(url, file, options) {
    options = options || {};
    var maxAttempts = options.maxAttempts === undefined || options.maxAttempts === null ? 5 : options.maxAttempts;
    if (typeof maxAttempts !== "number" || !Number.isInteger(maxAttempts) || maxAttempts < 1) {
      // Rejected like fetch() rejects bad arguments: the caller's .catch sees it, nothing is sent.
      return Promise.reject(new RangeError("UploadGuard.upload: maxAttempts must be a whole number of at least 1, not " +
        (typeof maxAttempts === "string" ? JSON.stringify(maxAttempts) : String(maxAttempts))));
    }
    var maxDelay = options.maxDelay;
    var onProgress = options.onProgress || function () {};
    var onStatus = options.onStatus || function () {};
    var fields = options.fields || {};
    var headers = options.headers || {};

    return new Promise(function (resolve, reject) {
      var attempt = 0;

      function status(text, state, extra) {
        var info = {state: state, attempt: attempt, maxAttempts: maxAttempts, delay: 0, status: null};
        for (var key in extra) info[key] = extra[key];
        onStatus(text, info);
      }

      function retryOrFail(httpStatus, data, header, why) {
        if (attempt >= maxAttempts) {
          var message = messageOf(httpStatus, data) + " (gave up after " + attempt + " attempts)";
          status(message, "failed", {status: httpStatus});
          reject(UploadError(message, httpStatus, data, attempt));
          return;
        }
        var delay = retryDelay(header, attempt, maxDelay);
        onProgress(0, file.size);  // the next attempt sends the whole file again
        var when = delay < 0.5 ? "now" : "in " + Math.round(delay) + " s";
        status(why + "; retrying " + when + "\u2026 (attempt " + (attempt + 1) + " of " + maxAttempts + ")",
               "retrying", {delay: delay, status: httpStatus});
        setTimeout(send, delay * 1000);
      }

      function send() {
        attempt += 1;
        var xhr = new XMLHttpRequest();
        var body = new FormData();
        Object.keys(fields).forEach(function (name) { body.append(name, fields[name]); });
        body.append(options.fieldName || "file", file, file.name);
        xhr.open("POST", url);
        xhr.setRequestHeader("Accept", "application/json");
        if (options.csrfToken) xhr.setRequestHeader("X-CSRFToken", options.csrfToken);
        Object.keys(headers).forEach(function (name) { xhr.setRequestHeader(name, headers[name]); });
        xhr.upload.onprogress = function (event) {
          if (event.lengthComputable) onProgress(event.loaded, event.total);
        };
        xhr.onload = function () {
          var data = parseBody(xhr);
          if (xhr.status >= 200 && xhr.status < 300) {
            onProgress(file.size, file.size);
            status("Stored.", "stored", {status: xhr.status});
            resolve({status: xhr.status, data: data, attempts: attempt, xhr: xhr});
          } else if (xhr.status === 503) {
            retryOrFail(503, data, xhr.getResponseHeader("Retry-After"), "The server cannot take uploads right now");
          } else {
            var message = messageOf(xhr.status, data);
            status(message, "failed", {status: xhr.status});
            reject(UploadError(message, xhr.status, data, attempt));
          }
        };
        xhr.onerror = xhr.ontimeout = function () {
          retryOrFail(0, null, null, "The connection failed");
        };
        status(attempt === 1 ? "Uploading\u2026" : "Uploading again\u2026", "uploading");
        onProgress(0, file.size);
        xhr.send(body);
      }

      send();
    });
  }

  /* -- resumable mode: tus 1.0 ------------------------------------------------ */
  /*
   * A large upload over a flaky link should cost a retry of one chunk, not of
   * the whole file.  resumableUpload speaks tus 1.0 (creation, core PATCHes,
   * termination) to an endpoint such as uploadguard.resumable.ResumableUploads:
   *
   *   UploadGuard.resumableUpload(file, {
   *     endpoint: "/files/",       // the tus creation URL (relative to the page)
   *     chunkSize: 8388608,        // bytes per PATCH (keep under nginx's client_max_body_size)
   *     metadata: {filename, filetype},  // Upload-Metadata (default: the file's name and type)
   *     csrfToken: token,          // sent as X-CSRFToken (Django's header)
   *     headers: {},               // more request headers
   *     maxAttempts: 10,           // failures in a row (no byte stored in between) before giving up
   *     maxDelay: 60,              // seconds waited at most between attempts (at most 300)
   *     stallTimeout: 10,          // seconds without progress before a request counts as stalled and is cut
   *     storage: localStorage,     // where upload URLs are remembered for a reload; null: nowhere
   *     signal: abortSignal,       // aborting it cancels, as .cancel() does
   *     onProgress: function (loaded, total) {},
   *     onStatus: function (text, info) {}  // info: {state, attempt, maxAttempts, delay, status, offset, url, stalled}
   *   }) -> Promise resolving to {url, size, requests}, with .cancel() -> Promise
   *
   * After a network error or a stall the helper asks the server (HEAD) how
   * many bytes it kept and sends only the rest: the progress never goes back
   * by more than the chunk in flight.  A stall (no progress for stallTimeout
   * seconds: a link that went silent, with no FIN or RST) says "Connection
   * stalled, reconnecting..." and reconnects at once.  The wait for an
   * answer counts too: a body handed to the network in full may still sit
   * in a silent link's buffers.  A server that takes longer than
   * stallTimeout to answer a chunk (a slow on_complete) is asked with a
   * HEAD instead; give such a server a larger stallTimeout.  While bytes go out
   * the status text shows the live percentage ("Uploading... 37 %", plus
   * "(resumed at 26 %)" after a resume).  503, 429 and 423 are retried after
   * their Retry-After; 404 or 410 (the server lost the upload) start a fresh
   * one; any other status rejects with an UploadError.  The upload URL is kept
   * in localStorage under a fingerprint of the file (name, size,
   * lastModified, endpoint), so choosing the same file after a reload resumes
   * it.  cancel() stops and sends a DELETE.  info.state is "uploading",
   * "retrying", "stored", "failed" or "cancelled".  Cross-origin endpoints
   * must expose Location, Upload-Offset, Upload-Length and Retry-After.
   * A chunkSize, maxAttempts or stallTimeout that is given but not a number
   * above 0 (whole for the first two) rejects at once with a RangeError,
   * sending nothing.
   */

  var TUS_VERSION = "1.0.0";
  var DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024;  // bytes per PATCH
  var DEFAULT_RESUMABLE_ATTEMPTS = 10;  // failures in a row, with no byte stored in between
  var DEFAULT_STALL_TIMEOUT = 10;  // seconds without progress before a request counts as stalled and is cut
  var STORAGE_PREFIX = "uploadguard:tus:";

  /* Base64 of the UTF-8 bytes of ``text`` (btoa alone takes Latin-1 only). */
  function base64(text) {
    var bytes = new TextEncoder().encode(text);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary);
  }

  function tusMetadata(metadata) {
    return Object.keys(metadata).map(function (key) {
      var value = metadata[key];
      return value === null || value === undefined || value === "" ? key : key + " " + base64(String(value));
    }).join(",");
  }

  /* The key an upload URL is remembered under: the same file (name, size,
   * lastModified) sent to the same endpoint finds it again after a reload. */
  function fingerprint(file, endpoint) {
    return STORAGE_PREFIX + JSON.stringify([endpoint, file.name, file.size, file.lastModified]);
  }

  function defaultStorage() {
    try {
      return root.localStorage || null;
    } catch (ignored) {
      return null;  // storage disabled (e.g. cookies blocked): uploads still resume within the page
    }
  }

  function remember(storage, key, value) {
    if (!storage) return;
    try {
      if (value === null) storage.removeItem(key);
      else storage.setItem(key, value);
    } catch (ignored) {
      // quota or privacy mode: resuming after a reload is lost, nothing else
    }
  }

  function recall(storage, key) {
    if (!storage) return null;
    try {
      return storage.getItem(key);
    } catch (ignored) {
      return null;
    }
  }

  /* A whole number of bytes from a response header, or null. */
  function headerNumber(xhr, name) {
    var text = (xhr.getResponseHeader(name) || "").trim();
    return /^\d+$/.test(text) ? parseInt(text, 10) : null;
  }

  /* options[name] if it is a number above 0 (a whole one if ``whole``),
   * ``fallback`` if it is not given, else a RangeError naming it: a typo must
   * not silently mean the default. */
  function positiveOption(options, name, fallback, whole) {
    var value = options[name];
    if (value === undefined || value === null) return fallback;
    if (typeof value !== "number" || !(value > 0) || !isFinite(value) || (whole && !Number.isInteger(value))) {
      throw new RangeError("UploadGuard.resumableUpload: " + name + " must be " +
        (whole ? "a whole number of at least 1" : "a number of seconds above 0") + ", not " +
        (typeof value === "string" ? JSON.stringify(value) : String(value)));
    }
    return value;
  }

  function resumableUpload(file, options) {
    options = options || {};
    var endpoint = new URL(options.endpoint || "/files/", root.document ? document.baseURI : undefined).href;
    var chunkSize, maxAttempts, stallTimeout;
    try {
      chunkSize = positiveOption(options, "chunkSize", DEFAULT_CHUNK_SIZE, true);
      maxAttempts = positiveOption(options, "maxAttempts", DEFAULT_RESUMABLE_ATTEMPTS, true);
      stallTimeout = positiveOption(options, "stallTimeout", DEFAULT_STALL_TIMEOUT, false);
    } catch (error) {
      var refused = Promise.reject(error);  // nothing sent
      refused.cancel = function () { return Promise.resolve(); };
      return refused;
    }
    var storage = options.storage === undefined ? defaultStorage() : options.storage;
    var metadata = options.metadata || {filename: file.name, filetype: file.type || "application/octet-stream"};
    var headers = options.headers || {};
    var onProgress = options.onProgress || function () {};
    var onStatus = options.onStatus || function () {};
    var key = fingerprint(file, endpoint);
    var url = recall(storage, key);
    var offset = 0;
    var failures = 0;  // in a row, reset whenever the server stores more bytes
    var requests = 0;
    var current = null;  // the request in flight
    var timer = null;  // the pending retry
    var over = false;
    var resumed = false;  // the next PATCH continues after a retry or a reload: say so
    var resumedAt = null;  // the percentage the last resume started from, for the status text
    var shown = null;  // the percentage the status text shows now; null: the text says something else
    var settle = {};
    var promise = new Promise(function (resolve, reject) { settle.resolve = resolve; settle.reject = reject; });

    function status(text, state, extra) {
      var info = {state: state, attempt: failures + 1, maxAttempts: maxAttempts, delay: 0, status: null,
                  offset: offset, url: url};
      for (var name in extra) info[name] = extra[name];
      shown = null;
      onStatus(text, info);
    }

    function percent(bytes) {
      return file.size ? Math.floor(100 * bytes / file.size) : 100;
    }

    /* The live status while bytes go out: once per whole percent, not per progress event. */
    function uploading(loaded) {
      var now = percent(loaded);
      if (now === shown) return;
      status("Uploading\u2026 " + now + " %" + (resumedAt === null ? "" : " (resumed at " + resumedAt + " %)"),
             "uploading");
      shown = now;
    }

    function finish(error) {
      over = true;
      if (error) {
        status(error.message, error.cancelled ? "cancelled" : "failed", {status: error.status});
        settle.reject(error);
        return;
      }
      remember(storage, key, null);
      onProgress(file.size, file.size);
      status("Stored.", "stored", {status: 204});
      settle.resolve({url: url, size: file.size, requests: requests});
    }

    function fail(httpStatus, xhr) {
      var data = xhr ? parseBody(xhr) : null;
      finish(UploadError(messageOf(httpStatus, data), httpStatus, data, requests));
    }

    /* One request; ``done(status, xhr, stalled)`` once, with status 0 for a
     * network error, and also ``stalled`` for a request that made no progress
     * for ``stallTimeout`` seconds (a link that vanished without a FIN or RST
     * never errors by itself). */
    function send(method, target, extra, body, progress, done) {
      var xhr = new XMLHttpRequest();
      var stall = null;
      var ended = false;
      function end(code, stalled) {
        if (ended) return;
        ended = true;
        clearTimeout(stall);
        current = null;
        if (!over) done(code, xhr, !!stalled);
      }
      function watch() {
        clearTimeout(stall);
        stall = setTimeout(function () { end(0, true); xhr.abort(); }, stallTimeout * 1000);
      }
      requests += 1;
      current = xhr;
      xhr.open(method, target);
      xhr.setRequestHeader("Tus-Resumable", TUS_VERSION);
      if (options.csrfToken) xhr.setRequestHeader("X-CSRFToken", options.csrfToken);
      Object.keys(headers).forEach(function (name) { xhr.setRequestHeader(name, headers[name]); });
      Object.keys(extra).forEach(function (name) { xhr.setRequestHeader(name, extra[name]); });
      xhr.upload.onprogress = function (event) {
        watch();
        if (progress) progress(event.loaded);
      };
      xhr.onload = function () { end(xhr.status); };
      xhr.onerror = xhr.onabort = function () { end(0); };
      watch();
      xhr.send(body === undefined ? null : body);
    }

    /* Try again later: after Retry-After on 503, 429 and 423, else after a
     * backoff of 1, 2, 4... seconds; asking the server for the offset first
     * whenever an upload URL is known, since a cut PATCH may have stored
     * part of its bytes. */
    function retry(httpStatus, xhr, why, stalled) {
      failures += 1;
      if (failures >= maxAttempts) {
        var message = (httpStatus ? messageOf(httpStatus, parseBody(xhr)) : "The server could not be reached.") +
          " (gave up after " + failures + " failed attempts in a row)";
        finish(UploadError(message, httpStatus, xhr && httpStatus ? parseBody(xhr) : null, requests));
        return;
      }
      var header = xhr && (httpStatus === 503 || httpStatus === 429 || httpStatus === 423)
        ? xhr.getResponseHeader("Retry-After") : null;
      // A stall has already waited stallTimeout: reconnect at once.
      var delay = stalled ? 0 : retryDelay(header, failures, options.maxDelay);
      var when = delay < 0.5 ? "now" : "in " + Math.round(delay) + " s";
      var text = stalled ? "Connection stalled, reconnecting\u2026" : why + "; retrying " + when + "\u2026";
      status(text + " (attempt " + (failures + 1) + " of " + maxAttempts + ")", "retrying",
             {delay: delay, status: httpStatus, stalled: !!stalled});
      timer = setTimeout(function () {
        timer = null;
        if (url) locate();
        else create();
      }, delay * 1000);
    }

    function retryable(httpStatus) {
      return httpStatus === 0 || httpStatus === 503 || httpStatus === 429 || httpStatus === 423;
    }

    function why(httpStatus) {
      if (httpStatus === 0) return "The connection failed";
      if (httpStatus === 429) return "Too many requests";
      if (httpStatus === 423) return "The upload is busy";
      return "The server cannot take uploads right now";
    }

    /* The server lost the upload (expired, storage replaced): start again. */
    function forget() {
      remember(storage, key, null);
      url = null;
      offset = 0;
      onProgress(0, file.size);
    }

    function create() {
      status("Uploading\u2026", "uploading");
      var extra = {"Upload-Length": String(file.size)};
      var meta = tusMetadata(metadata);
      if (meta) extra["Upload-Metadata"] = meta;
      send("POST", endpoint, extra, undefined, null, function (code, xhr, stalled) {
        var location = xhr.getResponseHeader("Location");
        if (code === 201 && location) {
          url = new URL(location, endpoint).href;
          remember(storage, key, url);
          offset = 0;
          next();
        } else if (retryable(code)) {
          retry(code, xhr, why(code), stalled);
        } else {
          fail(code, xhr);
        }
      });
    }

    /* HEAD: where does the server stand? */
    function locate() {
      send("HEAD", url, {}, undefined, null, function (code, xhr, stalled) {
        var stored = headerNumber(xhr, "Upload-Offset");
        var length = headerNumber(xhr, "Upload-Length");
        if ((code === 200 || code === 204) && stored !== null && (length === null || length === file.size) &&
            stored <= file.size) {
          if (stored > offset) failures = 0;
          offset = stored;
          resumed = true;
          onProgress(offset, file.size);
          next();
        } else if (code === 404 || code === 410 || code === 403 || (code >= 200 && code < 300)) {
          forget();  // unknown here, or a different file: a fresh upload
          create();
        } else if (retryable(code)) {
          retry(code, xhr, why(code), stalled);
        } else {
          fail(code, xhr);
        }
      });
    }

    function next() {
      if (offset >= file.size) {
        finish(null);
        return;
      }
      if (resumed) {
        resumed = false;
        resumedAt = percent(offset);
      }
      var start = offset;
      var end = Math.min(file.size, start + chunkSize);
      var extra = {"Upload-Offset": String(start), "Content-Type": "application/offset+octet-stream"};
      uploading(start);
      send("PATCH", url, extra, file.slice(start, end), function (loaded) {
        onProgress(start + Math.min(loaded, end - start), file.size);
        uploading(start + Math.min(loaded, end - start));
      }, function (code, xhr, stalled) {
        var stored = headerNumber(xhr, "Upload-Offset");
        if ((code === 204 || code === 200) && stored !== null && stored > start && stored <= file.size) {
          failures = 0;
          offset = stored;
          onProgress(offset, file.size);
          next();
        } else if (code === 404 || code === 410) {
          forget();
          retry(code, xhr, "The server lost the upload");
        } else if (code === 409 || code === 0 || retryable(code) || code === 204) {
          retry(code, xhr, code === 409 ? "The server is at another offset" : why(code), stalled);
        } else {
          fail(code, xhr);
        }
      });
    }

    /* Stop, and delete the upload on the server (tus termination); resolves
     * when the server has answered the DELETE, whatever it answered. */
    function cancel() {
      if (over) return Promise.resolve();
      over = true;
      clearTimeout(timer);
      if (current) current.abort();
      remember(storage, key, null);
      var error = UploadError("Cancelled.", 0, null, requests);
      error.cancelled = true;
      status("Cancelled.", "cancelled");
      settle.reject(error);
      if (!url) return Promise.resolve();
      return new Promise(function (resolve) {
        var xhr = new XMLHttpRequest();
        xhr.open("DELETE", url);
        xhr.setRequestHeader("Tus-Resumable", TUS_VERSION);
        if (options.csrfToken) xhr.setRequestHeader("X-CSRFToken", options.csrfToken);
        Object.keys(headers).forEach(function (name) { xhr.setRequestHeader(name, headers[name]); });
        xhr.onloadend = function () { resolve(); };
        xhr.send();
      });
    }

    if (options.signal) {
      if (options.signal.aborted) setTimeout(cancel, 0);
      else options.signal.addEventListener("abort", cancel);
    }
    if (url) {
      resumed = true;
      status("Resuming\u2026", "uploading");
      locate();  // progress starts where the server stands, not at 0
    } else {
      onProgress(0, file.size);
      create();
    }
    promise.cancel = cancel;
    return promise;
  }

  /* -- auto-binding: <form data-uploadguard> ---------------------------------- */

  function item(list, file) {
    var li = document.createElement("li");
    li.className = "uploadguard-item";
    li.dataset.state = "queued";
    var name = document.createElement("span");
    name.className = "uploadguard-name";
    name.textContent = file.name;
    var bar = document.createElement("progress");
    bar.max = 1;
    bar.value = 0;
    var text = document.createElement("span");
    text.className = "uploadguard-status";
    text.textContent = "Waiting\u2026";
    li.append(name, bar, text);
    list.append(li);
    return li;
  }

  function bind(form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var list = form.querySelector("[data-uploadguard-list]") || form.appendChild(document.createElement("ol"));
      var fields = {};
      var files = [];
      new FormData(form).forEach(function (value, name) {
        if (typeof value === "string") fields[name] = value;
        else if (value.name) files.push({name: name, file: value});
      });
      var queue = files.map(function (entry) {
        return {name: entry.name, file: entry.file, li: item(list, entry.file)};
      });
      var concurrency = wholeNumber(form.dataset.uploadguardConcurrency, 1, DEFAULT_CONCURRENCY);

      function next() {
        var job = queue.shift();
        if (!job) return Promise.resolve();
        var bar = job.li.querySelector("progress");
        var text = job.li.querySelector(".uploadguard-status");
        var options = {
          fieldName: job.name,
          fields: fields,
          csrfToken: fields.csrfmiddlewaretoken,
          onProgress: function (loaded, total) { bar.value = total ? loaded / total : 1; },
          onStatus: function (message, info) { text.textContent = message; job.li.dataset.state = info.state; }
        };
        var endpoint = form.dataset.uploadguardResumable;  // <form data-uploadguard-resumable="/files/">
        if (endpoint !== undefined) options.endpoint = endpoint || "/files/";
        return (endpoint === undefined ? upload(form.action, job.file, options) : resumableUpload(job.file, options))
        .then(function (result) {
          form.dispatchEvent(new CustomEvent("uploadguard:stored",
            {bubbles: true, detail: {file: job.file, item: job.li, result: result}}));
        }, function (error) {
          form.dispatchEvent(new CustomEvent("uploadguard:failed",
            {bubbles: true, detail: {file: job.file, item: job.li, error: error}}));
        }).then(next);
      }

      for (var i = 0; i < concurrency; i++) next();
      form.querySelectorAll("input[type=file]").forEach(function (input) { input.value = ""; });
    });
  }

  function bindAll() {
    document.querySelectorAll("form[data-uploadguard]").forEach(bind);
  }

  root.UploadGuard = {upload: upload, resumableUpload: resumableUpload, bind: bind, UploadError: UploadError,
                      _retryDelay: retryDelay};  // internal: exported for the tests
  if (typeof document !== "undefined") {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", bindAll);
    else bindAll();
  }
})(typeof window !== "undefined" ? window : this);
