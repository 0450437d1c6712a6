# pdproxy: one small image, no compiler needed at run time.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --create-home --uid 10001 --user-group pdproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/pdproxy.example.yaml /etc/pdproxy/pdproxy.example.yaml
USER 10001:10001
EXPOSE 8000
# Liveness, not readiness: /livez answers while the process runs, whatever the engines do (/health
# fails with them, and a restart would not bring an engine back).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PDPROXY_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["pdproxy"]
# Override with your servers (and set PDPROXY_PORT if you change the port, for the health check):
#   docker run -p 8000:8000 pdproxy --prefill-servers 10.0.0.1:8100 --decode-servers 10.0.0.3:8200
CMD ["demo", "--host", "0.0.0.0"]
