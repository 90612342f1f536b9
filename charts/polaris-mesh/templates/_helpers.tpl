{{/* The release's resource name: the release name, unless it already holds the chart's. */}}
{{- define "polaris.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "polaris.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "polaris.labels" -}}
{{ include "polaris.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "polaris.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Service's DNS name inside the cluster. */}}
{{- define "polaris.host" -}}
{{- printf "%s.%s.svc" (include "polaris.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "polaris.caSecret" -}}
{{- default (printf "%s-ca" (include "polaris.fullname" .)) .Values.ca.existingSecret -}}
{{- end -}}

{{/* Checks of the values, included by the Deployment so that a bad value fails the render. */}}
{{- define "polaris.validate" -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- fail "replicas > 1: the embedded store has one writer (cluster mode is not configured by this chart)" -}}
{{- end -}}
{{- if not (has .Values.sync.mode (list "all" "demand")) -}}
{{- fail (printf "sync.mode must be all or demand, not %q" .Values.sync.mode) -}}
{{- end -}}
{{- if not (has .Values.injection.failurePolicy (list "Fail" "Ignore")) -}}
{{- fail (printf "injection.failurePolicy must be Fail or Ignore, not %q" .Values.injection.failurePolicy) -}}
{{- end -}}
{{- if not (has .Values.auth (list "auto" "on" "off")) -}}
{{- fail (printf "auth must be auto, on or off, not %q" .Values.auth) -}}
{{- end -}}
{{- if and .Values.ca.existingSecret (not .Values.ca.rootCert) .Values.injection.enabled -}}
{{- fail "ca.existingSecret needs ca.rootCert: the webhook's caBundle is the CA's root" -}}
{{- end -}}
{{- end -}}
