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
 *     maxAttempts: 5,           // attempts in all, the first one included
 *     maxDelay: 60,             // seconds waited at most between attempts (at most 300)
 *     onProgress: function (loaded, total) {},
 *     onStatus: function (text, info) {}  // info: {state, attempt, maxAttempts, delay, status}
 *   }) -> Promise resolving to {status, data, attempts, xhr}
 *
 *   info.state is "uploading", "retrying", "stored" or "failed".  The
 *   promise rejects with an UploadGuard.UploadError (.status, .data,
 *   .attempts).  Cross-origin uploads need the server to send
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
    var maxAttempts = Math.max(1, options.maxAttempts || 5);
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
        return upload(form.action, job.file, {
          fieldName: job.name,
          fields: fields,
          csrfToken: fields.csrfmiddlewaretoken,
          onProgress: function (loaded, total) { bar.value = total ? loaded / total : 1; },
          onStatus: function (message, info) { text.textContent = message; job.li.dataset.state = info.state; }
        }).then(function (result) {
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

  root.UploadGuard = {upload: upload, bind: bind, UploadError: UploadError,
                      _retryDelay: retryDelay};  // internal: exported for the tests
  if (typeof document !== "undefined") {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", bindAll);
    else bindAll();
  }
})(typeof window !== "undefined" ? window : this);
