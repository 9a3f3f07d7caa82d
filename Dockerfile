# syntax=docker/dockerfile:1
# One image for both processes: the relay daemon by default, the pull API sidecar with the command
# "api" (docker run IMAGE api). Build: docker build -t outbox-relay .

FROM node:22-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

FROM node:22-bookworm-slim AS runtime
# tini is PID 1: it forwards SIGTERM to node (which drains in-flight deliveries) and reaps children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
ENV NODE_ENV=production \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9464 \
    API_HOST=0.0.0.0 \
    PORT=3000
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only; no install scripts run (none are needed).
RUN npm ci --omit=dev --omit=optional --ignore-scripts \
 && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY sql ./sql
COPY config ./config
USER node
EXPOSE 9464 3000
# Works for either process: it checks METRICS_PORT, then PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["node", "dist/cli.js", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "node", "dist/cli.js"]
CMD ["run"]
