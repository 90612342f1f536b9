// chart-render renders a Helm chart the way `helm template` does, for the chart tests: Go's
// text/template with sprig's functions (Debian's golang-github-masterminds-sprig-dev) and the
// functions Helm adds (include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup), values
// merged from values.yaml and -f files, _*.tpl partials shared and not output, NOTES.txt skipped.
//
// What differs from `helm template` (the chart uses none of it): no subcharts or dependencies,
// no .Files, no --set (values come only from -f files), no hooks or test manifests, no
// values.schema.json; lookup returns an empty map (as `helm template` does without a cluster);
// .Capabilities is fixed (Kubernetes v1.20.2, the apiserver the tests run).
//
//	chart-render [-name RELEASE] [-namespace NS] [-f values.yaml ...] CHART_DIR
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig/v3"
	"github.com/ghodss/yaml"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

func main() {
	name := flag.String("name", "polaris-mesh", "release name")
	namespace := flag.String("namespace", "polaris-system", "release namespace")
	var files valueFiles
	flag.Var(&files, "f", "values file (repeatable; later files win)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: chart-render [-name R] [-namespace NS] [-f values.yaml ...] CHART_DIR")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), *name, *namespace, files)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chart-render:", err)
		os.Exit(1)
	}
	os.Stdout.WriteString(out)
}

func readYaml(path string) (map[string]interface{}, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// merge deep-merges src over dst as Helm coalesces values: maps merge, anything else replaces,
// and a null in src deletes the key.
func merge(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			dst[k] = merge(dm, sm)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func render(chart, release, namespace string, files []string) (string, error) {
	meta, err := readYaml(filepath.Join(chart, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	values, err := readYaml(filepath.Join(chart, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, f := range files {
		m, err := readYaml(f)
		if err != nil {
			return "", err
		}
		values = merge(values, m)
	}
	chartName, _ := meta["name"].(string)
	// Helm exposes Chart.yaml's fields capitalised.
	chartObj := map[string]interface{}{}
	for k, v := range meta {
		chartObj[strings.ToUpper(k[:1])+k[1:]] = v
	}
	top := map[string]interface{}{
		"Values": values,
		"Chart":  chartObj,
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": "v1.20.2", "Major": "1", "Minor": "20"},
			"APIVersions": []string{"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "admissionregistration.k8s.io/v1"},
		},
	}

	paths, err := filepath.Glob(filepath.Join(chart, "templates", "*"))
	if err != nil {
		return "", err
	}
	sort.Strings(paths)
	t := template.New("chart")
	funcs := sprig.TxtFuncMap()
	// Helm removes these two from sprig: templates must not read the renderer's environment.
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includeDepth := 0
	funcs["include"] = func(name string, data interface{}) (string, error) {
		includeDepth++
		defer func() { includeDepth-- }()
		if includeDepth > 1000 {
			return "", errors.New("include: nesting too deep")
		}
		var b bytes.Buffer
		err := t.ExecuteTemplate(&b, name, data)
		return b.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		c, err = c.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var b bytes.Buffer
		err = c.Execute(&b, data)
		return b.String(), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return nil, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return nil, errors.New(msg)
		}
		return v, nil
	}
	funcs["toYaml"] = func(v interface{}) string {
		b, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(b), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	funcs["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	t.Funcs(funcs).Option("missingkey=zero")

	var outputs []string
	for _, p := range paths {
		base := filepath.Base(p)
		if base == "NOTES.txt" {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		name := chartName + "/templates/" + base
		if _, err := t.New(name).Parse(string(b)); err != nil {
			return "", err
		}
		if !strings.HasPrefix(base, "_") {
			outputs = append(outputs, name)
		}
	}
	var out strings.Builder
	for _, name := range outputs {
		top["Template"] = map[string]interface{}{"Name": name, "BasePath": chartName + "/templates"}
		var b bytes.Buffer
		if err := t.ExecuteTemplate(&b, name, top); err != nil {
			return "", err
		}
		// Helm prints missing values as nothing, not "<no value>".
		text := strings.ReplaceAll(b.String(), "<no value>", "")
		text = strings.TrimPrefix(strings.TrimLeft(text, "\n"), "---")
		for _, doc := range strings.Split(text, "\n---") {
			if strings.TrimSpace(doc) == "" || isComments(doc) {
				continue
			}
			fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.Trim(doc, "\n"))
		}
	}
	return out.String(), nil
}

// isComments says whether a document holds only comments (Helm drops such documents).
func isComments(doc string) bool {
	for _, l := range strings.Split(doc, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}
