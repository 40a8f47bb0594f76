FROM python:3.12-slim

# tiktoken fetches encodings at run time; fetch them here so the proxy counts offline with the
# models' own encodings (the proxy looks in this cache and never downloads).
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[gpu,redis]' \
 && python -c "import tiktoken; [tiktoken.get_encoding(e) for e in ('o200k_base', 'cl100k_base')]" \
 && useradd --system --uid 10001 --home-dir /var/lib/meterproxy --create-home meterproxy \
 && chmod -R a+rX /opt/tiktoken

USER meterproxy
WORKDIR /var/lib/meterproxy
# The ledger and quota state: mount a volume here to keep them across containers.
VOLUME ["/var/lib/meterproxy"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["meterproxy", "serve"]
CMD ["--config", "/etc/meterproxy/meterproxy.yaml", "--host", "0.0.0.0", "--data-dir", "/var/lib/meterproxy"]
