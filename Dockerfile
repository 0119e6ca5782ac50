# One image for both tiers; docker-compose.yml picks the command. Weights ship inside a pip
# package, so nothing is downloaded at run time.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY shared ./shared
COPY web ./web
COPY worker ./worker
COPY models ./models
RUN useradd --create-home --uid 1000 imgsvc
USER imgsvc
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "8", "--worker-class", "gthread", "web.wsgi:app"]
