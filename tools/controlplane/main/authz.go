package main

// Authorization for identities outside system:masters (system:masters itself is allowed
// by the delegating authorizer options in main.go).
//
// Without --authorization-policy-file every authenticated user is allowed everything.
// With it, the file's RBAC objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding in
// rbac.authorization.k8s.io/v1; other documents such as Deployments are skipped, so a
// whole deploy manifest can be given) decide, with RBAC's matching rules. Subjects match
// the client certificate: User = CN, Group = O, ServiceAccount = a CN of
// "system:serviceaccount:<namespace>:<name>". Aggregated ClusterRoles are not expanded.
// resourceNames match the request's name, so, as in RBAC, they can never allow a create
// (a create names no object in its URL).
// As in kube-apiserver's default policy, discovery (GET /api, /apis, /openapi, /version)
// is allowed to every authenticated user.
// The file is re-read when its modification time changes.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/klog/v2"
	"sigs.k8s.io/yaml"
)

type policyAuthorizer struct {
	path    string
	mu      sync.Mutex
	modTime time.Time
	policy  *rbacPolicy
}

type rbacPolicy struct {
	roles        map[string][]rbacv1.PolicyRule // "namespace/name"; "/name" for ClusterRoles
	bindings     []rbacv1.RoleBinding           // ClusterRoleBindings have an empty namespace
	loadErrorMsg string
}

func newPolicyAuthorizer(path string) authorizer.Authorizer {
	return &policyAuthorizer{path: path}
}

func (a *policyAuthorizer) Authorize(_ context.Context, attrs authorizer.Attributes) (authorizer.Decision, string, error) {
	u := attrs.GetUser()
	if u == nil || !slices.Contains(u.GetGroups(), user.AllAuthenticated) {
		return authorizer.DecisionNoOpinion, "not authenticated", nil
	}
	if a.path == "" {
		return authorizer.DecisionAllow, "authenticated user (no --authorization-policy-file)", nil
	}
	// What kube-apiserver's bootstrap ClusterRoles system:discovery and
	// system:public-info-viewer grant to every authenticated user.
	if !attrs.IsResourceRequest() && attrs.GetVerb() == "get" {
		rule := rbacv1.PolicyRule{Verbs: []string{"get"}, NonResourceURLs: []string{
			"/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/",
			"/healthz", "/livez", "/readyz"}}
		if ruleAllows(rule, attrs) {
			return authorizer.DecisionAllow, "discovery is allowed to authenticated users", nil
		}
	}
	p := a.load()
	if p.loadErrorMsg != "" {
		return authorizer.DecisionNoOpinion, p.loadErrorMsg, nil
	}
	for _, b := range p.bindings {
		if b.Namespace != "" && b.Namespace != attrs.GetNamespace() {
			continue
		}
		if !slices.ContainsFunc(b.Subjects, func(s rbacv1.Subject) bool { return subjectMatches(s, b.Namespace, u) }) {
			continue
		}
		key := "/" + b.RoleRef.Name
		if b.RoleRef.Kind == "Role" {
			key = b.Namespace + "/" + b.RoleRef.Name
		}
		for _, rule := range p.roles[key] {
			if ruleAllows(rule, attrs) {
				return authorizer.DecisionAllow, fmt.Sprintf("allowed by %s %q via binding %s/%s", b.RoleRef.Kind, b.RoleRef.Name, b.Namespace, b.Name), nil
			}
		}
	}
	return authorizer.DecisionNoOpinion, "no RBAC rule in " + a.path + " allows this", nil
}

// load returns the parsed policy file, re-reading it when it changed.
func (a *policyAuthorizer) load() *rbacPolicy {
	a.mu.Lock()
	defer a.mu.Unlock()
	st, err := os.Stat(a.path)
	if err == nil && a.policy != nil && st.ModTime().Equal(a.modTime) {
		return a.policy
	}
	p := &rbacPolicy{roles: map[string][]rbacv1.PolicyRule{}}
	if err == nil {
		a.modTime = st.ModTime()
		err = p.parse(a.path)
	}
	if err != nil {
		p.loadErrorMsg = fmt.Sprintf("authorization policy file %s: %v", a.path, err)
		klog.Error(p.loadErrorMsg)
	}
	a.policy = p
	return p
}

func (p *rbacPolicy) parse(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := reader.Read()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var head struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal(doc, &head); err != nil {
			return err
		}
		if head.APIVersion != rbacv1.SchemeGroupVersion.String() {
			continue
		}
		switch head.Kind {
		case "Role", "ClusterRole":
			var r rbacv1.Role // same fields as ClusterRole apart from aggregationRule
			if err := yaml.Unmarshal(doc, &r); err != nil {
				return err
			}
			if head.Kind == "ClusterRole" {
				r.Namespace = ""
			}
			p.roles[r.Namespace+"/"+r.Name] = r.Rules
		case "RoleBinding", "ClusterRoleBinding":
			var b rbacv1.RoleBinding
			if err := yaml.Unmarshal(doc, &b); err != nil {
				return err
			}
			if head.Kind == "ClusterRoleBinding" {
				b.Namespace = ""
			}
			p.bindings = append(p.bindings, b)
		}
	}
}

func subjectMatches(s rbacv1.Subject, bindingNamespace string, u user.Info) bool {
	switch s.Kind {
	case rbacv1.UserKind:
		return s.Name == u.GetName()
	case rbacv1.GroupKind:
		return slices.Contains(u.GetGroups(), s.Name)
	case rbacv1.ServiceAccountKind:
		ns := s.Namespace
		if ns == "" {
			ns = bindingNamespace
		}
		return u.GetName() == "system:serviceaccount:"+ns+":"+s.Name
	}
	return false
}

// ruleAllows follows k8s.io/kubernetes/pkg/apis/rbac/v1 evaluation helpers.
func ruleAllows(rule rbacv1.PolicyRule, attrs authorizer.Attributes) bool {
	if !matches(rule.Verbs, attrs.GetVerb()) {
		return false
	}
	if !attrs.IsResourceRequest() {
		for _, u := range rule.NonResourceURLs {
			if u == "*" || u == attrs.GetPath() || (strings.HasSuffix(u, "*") && strings.HasPrefix(attrs.GetPath(), strings.TrimSuffix(u, "*"))) {
				return true
			}
		}
		return false
	}
	resource := attrs.GetResource()
	if attrs.GetSubresource() != "" {
		resource += "/" + attrs.GetSubresource()
	}
	resourceOK := slices.ContainsFunc(rule.Resources, func(r string) bool {
		return r == "*" || r == resource || (attrs.GetSubresource() != "" && r == "*/"+attrs.GetSubresource())
	})
	return resourceOK && matches(rule.APIGroups, attrs.GetAPIGroup()) &&
		(len(rule.ResourceNames) == 0 || slices.Contains(rule.ResourceNames, attrs.GetName()))
}

func matches(list []string, value string) bool {
	return slices.Contains(list, "*") || slices.Contains(list, value)
}
