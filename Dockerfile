# imgtriage serve in a container: CPU PyTorch, the serve and onnx extras, one bundle mounted
# read-only at /bundle. Build context: this repository (see .dockerignore).
#
#   docker build -t imgtriage .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/sar/bundle:/bundle:ro" imgtriage
#   # more processes: arguments after the image replace CMD (keep --port 8000 for the check)
#   docker run --rm -p 8000:8000 -v "$PWD/runs/sar/bundle:/bundle:ro" imgtriage \
#       /bundle --host 0.0.0.0 --port 8000 --workers 2 --threads 2
#
# The image downloads nothing at run time (IMGTRIAGE_OFFLINE=1): the bundle holds the weights.
FROM python:3.11-slim

# CPU wheels: the default PyPI torch wheel pulls several GB of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMGTRIAGE_OFFLINE=1

WORKDIR /opt/imgtriage
RUN pip install --index-url "$TORCH_INDEX" $TORCH
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve,onnx]" && useradd --create-home --uid 10001 imgtriage

USER imgtriage
EXPOSE 8000
# /readyz turns 200 once the model is loaded and warmed up; a large bundle needs the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["imgtriage", "serve"]
CMD ["/bundle", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
