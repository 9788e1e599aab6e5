{{/*
Names.
*/}}
{{- define "zhibo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, suffixed with the chart name unless the release name already contains it.
Kept to 40 characters so that "<fullname>-logic-worker-metrics" and similar stay within 63.
*/}}
{{- define "zhibo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "zhibo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
*/}}
{{- define "zhibo.labels" -}}
helm.sh/chart: {{ include "zhibo.chart" . }}
{{ include "zhibo.selectorLabels" . }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zhibo
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "zhibo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zhibo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one role. Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "zhibo.componentLabels" -}}
{{ include "zhibo.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "zhibo.componentSelectorLabels" -}}
{{ include "zhibo.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Image reference.
*/}}
{{- define "zhibo.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{- define "zhibo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "zhibo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "zhibo.secretName" -}}
{{- default (printf "%s-secrets" (include "zhibo.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{/*
A value as zhibo reads a ZHIBO_* variable: TOML scalars and arrays, else a string. YAML numbers arrive
here as float64, and `toString 1048576.0` would print 1.048576e+06, which TOML reads as a float that an
integer field refuses: whole numbers are printed as integers.
*/}}
{{- define "zhibo.envValue" -}}
{{- if kindIs "slice" . -}}
{{ toJson . }}
{{- else if and (kindIs "float64" .) (eq (float64 .) (floor .)) -}}
{{ int64 . }}
{{- else -}}
{{ toString . }}
{{- end -}}
{{- end }}

{{/*
ZHIBO_* variables of the store, shared by the ConfigMap and the migrate Job (a pre-install hook, which
runs before the ConfigMap exists). A YAML map.
*/}}
{{- define "zhibo.storeConfig" -}}
ZHIBO_LOG: {{ .Values.config.logLevel | quote }}
ZHIBO_STORE__KIND: "scylla"
ZHIBO_STORE__CQL_NODES: {{ toJson .Values.scylla.nodes | quote }}
ZHIBO_STORE__KEYSPACE: {{ .Values.scylla.keyspace | quote }}
ZHIBO_STORE__REPLICATION_FACTOR: {{ include "zhibo.envValue" .Values.scylla.replicationFactor | quote }}
{{- end }}

{{/*
Environment of every zhibo container: the user's extraEnv first (so that the URLs below may reference
them as $(NAME)), then the URLs, which stay out of the ConfigMap for that reason, then the role's own.
Call with (dict "root" $ "role" .Values.gateway).
*/}}
{{- define "zhibo.commonEnv" -}}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
- name: ZHIBO_BUS__NATS_URL
  value: {{ .root.Values.nats.url | quote }}
{{- with .root.Values.nats.auth.user }}
- name: ZHIBO_BUS__NATS_USER
  value: {{ . | quote }}
- name: ZHIBO_BUS__NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "zhibo.secretName" $.root }}
      key: nats-password
{{- end }}
{{- if .root.Values.nats.auth.token }}
- name: ZHIBO_BUS__NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "zhibo.secretName" .root }}
      key: nats-token
{{- end }}
{{- if .root.Values.nats.tls.required }}
- name: ZHIBO_BUS__NATS_TLS_REQUIRED
  value: "true"
{{- end }}
{{- if .root.Values.nats.tls.caSecret }}
- name: ZHIBO_BUS__NATS_TLS_CA
  value: "/etc/zhibo/nats-tls/ca.crt"
{{- end }}
- name: ZHIBO_STORE__REDIS_URL
  value: {{ .root.Values.redis.url | quote }}
- name: ZHIBO_TOKEN_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "zhibo.secretName" .root }}
      key: token-secret
{{- if include "zhibo.eventsOn" .root }}
- name: ZHIBO_PUSH__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ default (include "zhibo.secretName" .root) .root.Values.push.existingSecret }}
      key: {{ ternary .root.Values.push.existingSecretKey "push-secret" (ne .root.Values.push.existingSecret "") }}
{{- end }}
{{- if .root.Values.hooks.beforeSend.url }}
- name: ZHIBO_HOOKS__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "zhibo.secretName" .root }}
      key: hook-secret
{{- end }}
{{- with .role.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep and zhibo's own grace period both count against it.
*/}}
{{- define "zhibo.terminationGrace" -}}
{{- if kindIs "invalid" .role.terminationGracePeriodSeconds -}}
{{ add .root.Values.preStopSleepSeconds .root.Values.config.graceSecs 10 }}
{{- else -}}
{{ .role.terminationGracePeriodSeconds }}
{{- end -}}
{{- end }}

{{/*
Checksums that roll the pods when the chart-managed configuration changes.
*/}}
{{- define "zhibo.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
The Deployment of one role. Call with
(dict "root" $ "component" "gateway" "role" .Values.gateway "args" (list "gateway") "ports" LIST
      "volumes" LIST "volumeMounts" LIST "env" LIST).
*/}}
{{- define "zhibo.deployment" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "zhibo.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "zhibo.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not $role.autoscaling.enabled }}
  replicas: {{ $role.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "zhibo.componentSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "zhibo.componentSelectorLabels" $ctx | nindent 8 }}
        {{- with $role.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "zhibo.configChecksums" $root | nindent 8 }}
        {{- with $role.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "zhibo.serviceAccountName" $root }}
      # zhibo talks to no Kubernetes API.
      automountServiceAccountToken: false
      # Service links would inject ZHIBO_*_SERVICE_HOST-style variables for Services named "zhibo-...",
      # and zhibo refuses unknown ZHIBO_* variables (exit 64).
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ include "zhibo.terminationGrace" . }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "zhibo.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "zhibo.fullname" $root }}-config
          env:
            {{- include "zhibo.commonEnv" . | trim | nindent 12 }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            {{- with .ports }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            - name: metrics
              containerPort: {{ $root.Values.metricsPort }}
              protocol: TCP
          {{- with $role.startupProbe }}
          startupProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $role.livenessProbe }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $role.readinessProbe }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", "{{ $root.Values.preStopSleepSeconds }}"]
          resources:
            {{- toYaml $role.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with .volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- if $root.Values.nats.tls.caSecret }}
            - name: nats-tls
              mountPath: /etc/zhibo/nats-tls
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- with .volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $root.Values.nats.tls.caSecret }}
        - name: nats-tls
          secret:
            secretName: {{ . }}
            defaultMode: 288
        {{- end }}
      {{- with $role.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $role.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $role.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml $role.topologySpreadConstraints | nindent 8 }}
      {{- else if $root.Values.spreadAcrossNodes }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "zhibo.componentSelectorLabels" $ctx | nindent 14 }}
      {{- end }}
{{- end }}

{{/*
PodDisruptionBudget of one role. Call with (dict "root" $ "component" "gateway" "role" .Values.gateway).
*/}}
{{- define "zhibo.pdb" -}}
{{- if .role.pdb.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "zhibo.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "zhibo.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" .role.pdb.minAvailable) }}
  minAvailable: {{ .role.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .role.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "zhibo.componentSelectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}

{{/*
HorizontalPodAutoscaler of one role. Call with (dict "root" $ "component" "gateway" "role" .Values.gateway).
*/}}
{{- define "zhibo.hpa" -}}
{{- $a := .role.autoscaling }}
{{- if $a.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "zhibo.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "zhibo.componentLabels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "zhibo.fullname" .root }}-{{ .component }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  {{- if or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage }}
  metrics:
    {{- with $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Headless Service that exposes a role's metrics port to Prometheus, never to clients; rendered with the
ServiceMonitor, which selects these Services by the zhibo.io/metrics label.
*/}}
{{- define "zhibo.metricsService" -}}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "zhibo.fullname" .root }}-{{ .component }}-metrics
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "zhibo.componentLabels" $ctx | nindent 4 }}
    zhibo.io/metrics: "true"
spec:
  type: ClusterIP
  clusterIP: None
  selector:
    {{- include "zhibo.componentSelectorLabels" $ctx | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .root.Values.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{/*
"true" when push events or event webhooks are on (the push secret, the push-relay Deployment); "" otherwise.
*/}}
{{- define "zhibo.eventsOn" -}}
{{- if or .Values.push.enabled .Values.webhooks.events -}}true{{- end -}}
{{- end }}
