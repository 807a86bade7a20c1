{{/* The app name (app.kubernetes.io/name): the chart's name unless overridden. */}}
{{- define "kiloclaw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The base name of every object: the release name when it contains the app name (the default release
     "kiloclaw-operator" gives the kustomize base's names), else <release>-<name>. */}}
{{- define "kiloclaw.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "kiloclaw.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels Helm adds to every object (and nothing else does): tests/unit/test_chart.py strips exactly these when
     it compares the chart with the kustomize base. */}}
{{- define "kiloclaw.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The labels of every object of the install (the kustomize base adds part-of to all of them). */}}
{{- define "kiloclaw.labels" -}}
app.kubernetes.io/name: {{ include "kiloclaw.name" . }}
app.kubernetes.io/part-of: kiloclaw
{{ include "kiloclaw.helmLabels" . }}
{{- end }}

{{/* The operator pods' selector (Deployment, PodDisruptionBudget). */}}
{{- define "kiloclaw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiloclaw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The labels of the operator's workload objects and of its pods' template. */}}
{{- define "kiloclaw.operatorLabels" -}}
{{ include "kiloclaw.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kiloclaw.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* An object kept as a file of the repository (files/ links to crds/ and deploy/monitoring/), placed in the
     release namespace when namespaced, with Helm's labels added: renders it from a dict. Arguments: list of
     the root context, the object (dict), whether it is namespaced. */}}
{{- define "kiloclaw.fileObject" -}}
{{- $root := index . 0 }}
{{- $object := index . 1 }}
{{- $metadata := $object.metadata }}
{{- if index . 2 }}
{{- $_ := set $metadata "namespace" $root.Release.Namespace }}
{{- end }}
{{- $_ := set $metadata "labels" (merge (default dict $metadata.labels) (fromYaml (include "kiloclaw.helmLabels" $root))) }}
{{- toYaml $object }}
{{- end }}
