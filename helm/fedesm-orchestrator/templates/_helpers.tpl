{{/* Names and labels, in the style of `helm create`. */}}
{{- define "fedesm-orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fedesm-orchestrator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedesm-orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedesm-orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedesm-orchestrator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fedesm-orchestrator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: orchestrator
app.kubernetes.io/part-of: fedesm
{{- end }}

{{- define "fedesm-orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedesm-orchestrator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fedesm-orchestrator.pvcName" -}}
{{- default (printf "%s-workspace" (include "fedesm-orchestrator.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is pinned (the digest wins). */}}
{{- define "fedesm-orchestrator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the admin console has its own port; NVFLARE 2.x serves both on fed_learn_port by default. */}}
{{- define "fedesm-orchestrator.separateAdminPort" -}}
{{- if and .Values.nvflare.adminPort (ne (int .Values.nvflare.adminPort) (int .Values.nvflare.flPort)) }}true{{ end }}
{{- end }}
