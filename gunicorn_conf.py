# gunicorn configuration for applications that take uploads.
#
#   gunicorn -c gunicorn_conf.py app:application
#
# Without a checkout, the same configuration is in the installed package:
#
#   gunicorn -c python:uploadguard.gunicorn app:application
#
# Every value is decided in uploadguard/gunicorn.py (its docstring says why);
# this file names them the way gunicorn's example_config.py does, so you can
# read what runs and replace any line with a literal.  From the environment:
#
#   PORT                          bind 0.0.0.0:$PORT (default 127.0.0.1:8000)
#   WEB_CONCURRENCY               workers (default 2 x CPUs + 1, at most 8)
#   GUNICORN_MAX_REQUESTS         max_requests (default 500; 0 = never recycle)
#   GUNICORN_MAX_REQUESTS_JITTER  max_requests_jitter (default 100)
#   GUNICORN_TIMEOUT              timeout, seconds or 10m (default 600)
#   GUNICORN_GRACEFUL_TIMEOUT     graceful_timeout, seconds (default 60)
#   UPLOADGUARD_*                 the upload settings, read by the hooks and the
#                                 middleware alike (the README's "Settings reference")
#
# gunicorn's precedence holds: this file < GUNICORN_CMD_ARGS < command line,
# e.g. GUNICORN_CMD_ARGS="--worker-tmp-dir /run/myapp".
#
# Every public name here must be a gunicorn setting (gunicorn silently
# ignores unknown names); helpers start with an underscore.

import uploadguard.gunicorn as _uploadguard

#
# Server socket
#
#   bind - 0.0.0.0:$PORT when PORT is set (gunicorn's own convention),
#       else 127.0.0.1:8000 (behind nginx on the same host).
#

bind = _uploadguard.bind

#
# Worker processes
#
#   workers - WEB_CONCURRENCY, else 2 x CPUs + 1, at most 8.
#
#   max_requests, max_requests_jitter - each worker is recycled after
#       500 + up to 100 requests, so whatever a worker accumulated (memory,
#       a stale view of the file system) cannot last.
#
#   timeout - 600 s: a slow upload is not a hung worker.
#
#   graceful_timeout - 60 s for in-flight requests on a restart, inside
#       systemd's default TimeoutStopSec of 90 s.
#

workers = _uploadguard.workers
max_requests = _uploadguard.max_requests
max_requests_jitter = _uploadguard.max_requests_jitter
timeout = _uploadguard.timeout
graceful_timeout = _uploadguard.graceful_timeout

#
# Server mechanics
#
#   worker_tmp_dir - where the master creates each worker's heartbeat file:
#       /dev/shm (a tmpfs, as gunicorn's FAQ advises), else a directory the
#       master creates (~/.cache/uploadguard/gunicorn).  The hooks below
#       recreate it before each new worker, so deleting it can never stop
#       the server.
#

worker_tmp_dir = _uploadguard.worker_tmp_dir

#
# Logging
#
#   accesslog, errorlog - "-": stdout and stderr, for journald or docker.
#

accesslog = _uploadguard.accesslog
errorlog = _uploadguard.errorlog

#
# Server hooks (bodies in uploadguard/gunicorn.py; none of them can stop
# the server, except on_starting for a bad UPLOADGUARD_* value)
#
#   on_starting - stop with one line naming a bad UPLOADGUARD_* variable,
#       before any worker forks; log the effective upload settings.
#
#   nworkers_changed, child_exit - in the master, before new workers are
#       made: make sure worker_tmp_dir can take their heartbeat files.
#
#   post_worker_init - in each worker: create and check the upload temp dir
#       and point tempfile and TMPDIR at it; if it is unusable, log it and
#       boot anyway (uploads get 503, everything else works).
#
#   pre_request - gunicorn's default (log "METHOD path" at debug), and
#       "100 Continue" deferred until the application reads the body, so a
#       client refused with a 413 or 503 never sends it.
#


def on_starting(server):
    _uploadguard.on_starting(server)


def nworkers_changed(server, new_value, old_value):
    _uploadguard.nworkers_changed(server, new_value, old_value)


def child_exit(server, worker):
    _uploadguard.child_exit(server, worker)


def post_worker_init(worker):
    _uploadguard.post_worker_init(worker)


def pre_request(worker, req):
    _uploadguard.pre_request(worker, req)
