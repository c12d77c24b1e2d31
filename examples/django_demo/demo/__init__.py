"""The uploadguard demo: a small Django site for uploading photos.

Run it with ``scripts/demo`` (gunicorn with the project's ``gunicorn_conf.py``
on http://127.0.0.1:8000/).  Pages:

``/``               upload several photos at once (one request and one progress
                    bar per file, retried on 503 by ``uploadguard/upload.js``)
                    and a gallery of what was stored
``/upload/``        POST target; answers JSON to ``Accept: application/json``
``/media/<name>``   a stored file
``/static/...``     static files, ``uploadguard/upload.js`` among them
``/favicon.ico``    204: no icon, and no "Not Found" line in the log

Images are re-compressed with :func:`uploadguard.images.compress_image`
(JPEG quality 85, or 95 with "high quality"); anything else is stored as-is
and offered as a download.  There is no database: the gallery lists the
storage directory.

Environment (all optional):

``DEMO_STORAGE_DIR``       where uploads are stored (default ``var/uploads`` here)
``UPLOADGUARD_TEMP_DIR``   where uploads are spooled (default ``var/tmp`` here)
``UPLOADGUARD_RESUMABLE_STORAGE``  where resumable uploads are assembled (default ``var/resumable`` here)
``DEMO_DEBUG``             ``1`` turns Django's DEBUG on (default off)
"""
